//! A local load balancer in front of a query head: one stable port per domain, connections
//! spread round-robin over the ready replicas (per connection, like a Kubernetes Service).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The replicas a balancer sends connections to.
#[derive(Clone, Default)]
pub struct Backends {
    ready: Arc<RwLock<Vec<SocketAddr>>>,
    next: Arc<AtomicUsize>,
}

impl Backends {
    /// Replaces the set of ready replicas.
    pub fn set(&self, addrs: Vec<SocketAddr>) {
        if let Ok(mut ready) = self.ready.write() {
            *ready = addrs;
        }
    }

    fn pick(&self) -> Option<SocketAddr> {
        let ready = self.ready.read().ok()?;
        if ready.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
        ready.get(i).copied()
    }
}

const UNAVAILABLE: &str =
    "{\"error\":\"unavailable\",\"message\":\"no ready replica of this query head\"}";

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, backends: Backends) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            // Out of file descriptors, typically: let connections drain instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let backends = backends.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let upstream = match backends.pick() {
                Some(addr) => TcpStream::connect(addr).await.ok(),
                None => None,
            };
            match upstream {
                Some(mut upstream) => {
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                None => {
                    let response = format!(
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{UNAVAILABLE}",
                        UNAVAILABLE.len()
                    );
                    let _ = client.write_all(response.as_bytes()).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn echo_server(tag: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let _ = s.write_all(tag.as_bytes()).await;
            }
        });
        addr
    }

    async fn read_from(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn spreads_connections_and_answers_503_without_replicas() {
        let backends = Backends::default();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = l.local_addr().unwrap();
        tokio::spawn(serve(l, backends.clone()));
        assert!(read_from(front).await.starts_with("HTTP/1.1 503"));
        backends.set(vec![echo_server("a").await, echo_server("b").await]);
        let mut seen = vec![
            read_from(front).await,
            read_from(front).await,
            read_from(front).await,
        ];
        seen.sort();
        assert_eq!(seen, ["a", "a", "b"].map(String::from).to_vec());
    }
}
