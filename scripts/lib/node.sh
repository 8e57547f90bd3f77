# The dev environment's Kubernetes node: containerd, kubelet, kube-scheduler, kube-proxy, a CNI
# bridge and CoreDNS. Sourced by scripts/dev-env, which defines log, die, step, spawn, running,
# wait_for, stop, $state, $certs, $tools_dir and the versions.
#
# Every change to the host is undone at down (node_stop, then node_cleanup once the other servers
# stopped), and nothing is touched when up never set the node up: the bridge and its route, the
# iptables rules (ours, kube-proxy's, the kubelet's), the sysctls saved at up, the pods' network
# namespaces, mounts and cgroups, and the few paths the daemons use whatever their config says
# (containerd's shim sockets, the kubelet's plugin folder, CNI's cache). What cannot be undone is
# said, and makes down fail.
#
# Network: pods live on the bridge's subnet and reach the host only at the bridge address, where
# the API server, RabbitMQ and MariaDB listen. Forwarding is on for the bridge alone, and a rule
# drops whatever would be routed between the bridge and any other interface: no pod reaches
# beyond this machine, and nothing listens on the external interface.

# Where the host's kernel interfaces and system paths are: "" (the machine itself), or a
# scratch folder when scripts/tests/run plays the host with stubs (never touching the real one).
host_root=${CHIMERA_HOST_ROOT:-}
proc_sys="$host_root/proc/sys"
cgroup_root="$host_root/sys/fs/cgroup"
node_bridge=${CHIMERA_NODE_BRIDGE:-chimera0}
node_ip=${CHIMERA_NODE_IP:-10.244.0.1}
pod_cidr=${CHIMERA_POD_CIDR:-10.244.0.0/24}
service_cidr=${CHIMERA_SERVICE_CIDR:-10.0.0.0/16}
dns_ip=${service_cidr%.*}.10
node_name=chimera-dev-node
node_dir="$state/node"
containerd_sock="$node_dir/containerd/containerd.sock"
iptables_chain=CHIMERA-DEV-NODE
# Paths the daemons create whatever their configuration says: removed at down when they were
# not there before up (recorded in $node_dir/created-paths).
host_paths=("$host_root"/run/containerd/s "$host_root"/run/containerd "$host_root"/run/netns
  "$host_root"/var/lib/kubelet/device-plugins "$host_root"/var/lib/kubelet
  "$host_root"/var/lib/cni/results "$host_root"/var/lib/cni "$host_root"/var/log/containers)
# Host-wide settings the kubelet (or create_bridge) changes, saved at up and restored at down.
saved_sysctls=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/bridge/bridge-nf-call-iptables)
# The kubelet's cgroup root: every pod process lives below <hierarchy>/chimera-dev, so down kills
# and removes only this node's cgroups (never another kubelet's kubepods).
cgroup_name=chimera-dev

# The pause program's version: its source's hash, as scripts/install-tools names its build.
pause_version=$(sha256sum "$here/tools/pause/main.go" | cut -c1-12)
pause_image="chimera.dev/pause:$pause_version"
coredns_image="chimera.dev/coredns:$COREDNS_VERSION"

ctr_() { ctr --address "$containerd_sock" --namespace k8s.io "$@"; }

# --- host changes -------------------------------------------------------------------------------

record_host_state() {
  step="record the host's state"
  [ -f "$node_dir/sysctls" ] && return
  mkdir -p "$node_dir"
  local path key
  # A bridge that is there before up is someone's: down leaves it, taking back only the address
  # and route up added to it.
  if ip link show "$node_bridge" >/dev/null 2>&1; then
    : >"$node_dir/bridge-existed"
    if ip -4 -o addr show dev "$node_bridge" | grep -F " $node_ip/" >/dev/null; then : >"$node_dir/address-existed"; fi
    if ip route show "$service_cidr" dev "$node_bridge" 2>/dev/null | grep . >/dev/null; then : >"$node_dir/route-existed"; fi
  fi
  : >"$node_dir/created-paths.tmp"
  for path in "${host_paths[@]}"; do
    [ -e "$path" ] || echo "$path" >>"$node_dir/created-paths.tmp"
  done
  mv "$node_dir/created-paths.tmp" "$node_dir/created-paths"
  : >"$node_dir/sysctls.tmp"
  for key in "${saved_sysctls[@]}"; do
    [ -f "$proc_sys/$key" ] && echo "$key $(cat "$proc_sys/$key")" >>"$node_dir/sysctls.tmp"
  done
  mv "$node_dir/sysctls.tmp" "$node_dir/sysctls"
}

# require_free_range CIDR: no interface but the node's bridge routes CIDR (taking over a range
# the machine uses would cut it off its own network).
require_free_range() {
  local routes
  routes=$(ip -4 route show to match "${1%/*}" 2>/dev/null | grep -v -e '^default' -e "dev $node_bridge" || true)
  [ -z "$routes" ] || die "the machine already routes $1 ($routes): set CHIMERA_POD_CIDR/CHIMERA_NODE_IP (and CHIMERA_SERVICE_CIDR) to free ranges"
}

create_bridge() {
  step="create the node's bridge $node_bridge ($node_ip)"
  command -v ip >/dev/null 2>&1 || die "ip (iproute2) not found: run scripts/install-tools"
  require_free_range "$pod_cidr"
  require_free_range "$service_cidr"
  if ! ip link show "$node_bridge" >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "the node needs root (network bridge, iptables, cgroups)"
    log "creating bridge $node_bridge with $node_ip for pods on $pod_cidr"
    ip link add "$node_bridge" type bridge
  fi
  # (checked apart from the link: an up that died in between left a bridge without it)
  if ! ip -4 -o addr show dev "$node_bridge" | grep -F " $node_ip/" >/dev/null; then
    ip addr add "$node_ip/${pod_cidr#*/}" dev "$node_bridge"
  fi
  ip link set "$node_bridge" up
  # Service addresses route to the bridge too: kube-proxy rewrites them to pods, and one it has
  # no rule for (yet) dies on the bridge instead of taking the default route off the machine.
  ip route show "$service_cidr" dev "$node_bridge" 2>/dev/null | grep . >/dev/null \
    || ip route add "$service_cidr" dev "$node_bridge"
  # Forwarding for this bridge only (pod -> Service -> pod): the host-wide switch stays as it is.
  echo 1 >"$proc_sys/net/ipv4/conf/$node_bridge/forwarding"
  # kube-proxy's Service rules must see bridged traffic (pod -> Service -> pod on one bridge).
  [ ! -f "$proc_sys/net/bridge/bridge-nf-call-iptables" ] || echo 1 >"$proc_sys/net/bridge/bridge-nf-call-iptables"
  [ -f "$proc_sys/net/bridge/bridge-nf-call-iptables" ] \
    || die "bridged traffic does not pass iptables (no /proc/sys/net/bridge: the kernel lacks br_netfilter)"
  if ! iptables -w -n -L "$iptables_chain" >/dev/null 2>&1; then
    iptables -w -N "$iptables_chain"
    iptables -w -A "$iptables_chain" -i "$node_bridge" ! -o "$node_bridge" -j DROP
    iptables -w -A "$iptables_chain" -o "$node_bridge" ! -i "$node_bridge" -j DROP
  fi
  iptables -w -C FORWARD -j "$iptables_chain" 2>/dev/null || iptables -w -I FORWARD 1 -j "$iptables_chain"
}

# --- certificates and configuration ---------------------------------------------------------------

make_node_certs() {
  step="generate the node's certificates"
  [ -f "$certs/kube-proxy.crt" ] && return
  local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  sign kubelet-serving "/CN=$node_name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$node_ip,DNS:$node_name"
  # The Node authorizer knows a kubelet by this name and group.
  sign kubelet "/O=system:nodes/CN=system:node:$node_name" "$client"
  # Users the default RBAC bindings already grant what each component needs.
  sign kube-scheduler "/CN=system:kube-scheduler" "$client"
  sign kube-proxy "/CN=system:kube-proxy" "$client"
}

# write_file FILE: stdin into FILE, leaving FILE untouched when the content is the same (kube-proxy
# exits when its configuration file changes).
write_file() {
  cat >"$1.new"
  if cmp -s "$1.new" "$1"; then rm -f "$1.new"; else mv "$1.new" "$1"; fi
}

write_node_config() {
  step="write the node's configuration"
  mkdir -p "$node_dir"/{containerd,kubelet,cni/net.d,cni/ipam,certs.d/_default}
  kubeconfig_for kubelet "$node_dir/kubelet.kubeconfig"
  kubeconfig_for kube-scheduler "$node_dir/scheduler.kubeconfig"
  kubeconfig_for kube-proxy "$node_dir/proxy.kubeconfig"

  # Every registry is this unreachable loopback port: a pod naming an image that was not
  # imported fails at once (ErrImagePull) and no request ever leaves the machine.
  write_file "$node_dir/certs.d/_default/hosts.toml" <<'EOF'
server = "http://127.0.0.1:9"
[host."http://127.0.0.1:9"]
  capabilities = ["pull", "resolve"]
EOF
  write_file "$node_dir/containerd/config.toml" <<EOF
version = 2
root = "$node_dir/containerd/root"
state = "$node_dir/containerd/state"
[grpc]
  address = "$containerd_sock"
[ttrpc]
  address = "$containerd_sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$node_dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # root here cannot lower oom_score_adj (no CAP_SYS_RESOURCE)
  restrict_oom_score_adj = true
  # no hugetlb hierarchy on every kernel (this one has none)
  disable_hugetlb_controller = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # containerd 1.6 cannot tell the kubelet its driver: both say cgroupfs
        SystemdCgroup = false
        Root = "$node_dir/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$node_dir/certs.d"
EOF
  # hairpinMode without promiscMode (the bridge plugin refuses both at once); isGateway false
  # keeps host-wide forwarding off.
  write_file "$node_dir/cni/net.d/10-chimera-dev.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "chimera-dev",
  "plugins": [{
    "type": "bridge",
    "bridge": "$node_bridge",
    "isGateway": false,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "dataDir": "$node_dir/cni/ipam",
      "ranges": [[{"subnet": "$pod_cidr", "gateway": "$node_ip"}]],
      "routes": [{"dst": "0.0.0.0/0"}]
    }
  }]
}
EOF
  # Pods with dnsPolicy Default get this, never the machine's resolver.
  printf 'nameserver %s\n' "$dns_ip" | write_file "$node_dir/kubelet/resolv.conf"
  write_file "$node_dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $certs/kubelet-serving.crt
tlsPrivateKeyFile: $certs/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $certs/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /$cgroup_name
failCgroupV1: false
podLogsDir: $node_dir/pod-logs
containerRuntimeEndpoint: unix://$containerd_sock
clusterDNS: [$dns_ip]
clusterDomain: cluster.local
resolvConf: $node_dir/kubelet/resolv.conf
# Imported images are the only images: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%}
volumePluginDir: $node_dir/kubelet/volume-plugins
serializeImagePulls: false
maxPods: 110
shutdownGracePeriod: 0s
EOF
  write_file "$node_dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $node_dir/proxy.kubeconfig}
hostnameOverride: $node_name
mode: iptables
clusterCIDR: $pod_cidr
bindAddress: $node_ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Nothing host-wide: NodePorts on the node address only, no route_localnet, conntrack as it is
# (the defaults change them host-wide).
nodePortAddresses: [$node_ip/32]
iptables: {localhostNodePorts: false}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# --- images -------------------------------------------------------------------------------------

# scratch_image NAME ARCHIVE BINARY [ARG...]: an image of one static program, run as a non-root
# user, built with buildah from scratch and kept as a docker archive in the tools cache.
scratch_image() {
  local name=$1 archive=$2 binary=$3
  shift 3
  [ -f "$archive" ] && return
  command -v buildah >/dev/null 2>&1 || die "buildah not found: run scripts/install-tools"
  local container args=""
  container=$(buildah_ from scratch)
  buildah_ copy "$container" "$binary" "/$(basename "$binary")" >/dev/null
  for arg in "/$(basename "$binary")" "$@"; do args+="\"$arg\","; done
  buildah_ config --entrypoint "[${args%,}]" --user 65532:65532 "$container"
  mkdir -p "$(dirname "$archive")"
  buildah_ commit --quiet --rm "$container" "docker-archive:$archive.tmp:$name" >/dev/null
  mv "$archive.tmp" "$archive"
}

# buildah with storage of its own under the tools cache (never the machine's image store).
buildah_() {
  buildah --root "$tools_dir/buildah/storage" --runroot "$tools_dir/buildah/run" --storage-driver vfs "$@"
}

import_image() { # import_image ARCHIVE NAME
  ctr_ images ls -q | grep -Fx "$2" >/dev/null && return
  ctr_ images import "$1" >/dev/null
}

node_images() {
  step="build and import the node's own images (pause, CoreDNS)"
  local pause="$tools_dir/pause-$pause_version/pause"
  local coredns="$tools_dir/coredns-$COREDNS_VERSION/coredns"
  [ -x "$pause" ] || die "the pause program is not built: run scripts/install-tools"
  [ -x "$coredns" ] || die "CoreDNS is not built: run scripts/install-tools"
  scratch_image "$pause_image" "$tools_dir/images/pause-$pause_version.tar" "$pause"
  scratch_image "$coredns_image" "$tools_dir/images/coredns-$COREDNS_VERSION.tar" "$coredns" -conf /etc/coredns/Corefile
  import_image "$tools_dir/images/pause-$pause_version.tar" "$pause_image"
  import_image "$tools_dir/images/coredns-$COREDNS_VERSION.tar" "$coredns_image"
}

# --- daemons ------------------------------------------------------------------------------------

start_containerd() {
  step="start containerd"
  running containerd && return
  command -v containerd >/dev/null 2>&1 || die "containerd not found: run scripts/install-tools"
  log "starting containerd ($containerd_sock)"
  spawn containerd containerd --config "$node_dir/containerd/config.toml"
  wait_for containerd 30 ctr --address "$containerd_sock" version
}

node_ready() {
  [ "$(kubectl --kubeconfig "$kubeconfig" get node "$node_name" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# The kubelet's cgroup root, in every hierarchy (cgroup v1) or once (v2): it must exist.
make_cgroups() {
  local hierarchy
  if [ -f "$cgroup_root/cgroup.controllers" ]; then
    mkdir -p "$cgroup_root/$cgroup_name"
    return
  fi
  for hierarchy in "$cgroup_root"/*/; do
    mkdir -p "$hierarchy$cgroup_name"
  done
}

start_kubelet() {
  step="start the kubelet"
  running kubelet && return
  make_cgroups
  local bin="$tools_dir/kubernetes-$K8S_VERSION/kubelet"
  [ -x "$bin" ] || die "kubelet not built: run scripts/install-tools"
  log "starting the kubelet (node $node_name at $node_ip)"
  spawn kubelet "$bin" --config "$node_dir/kubelet/config.yaml" \
    --kubeconfig "$node_dir/kubelet.kubeconfig" --root-dir "$node_dir/kubelet/root" \
    --cert-dir "$node_dir/kubelet/pki" --hostname-override "$node_name" --node-ip "$node_ip" --v 1
  wait_for kubelet 60 node_ready
}

start_scheduler() {
  step="start kube-scheduler"
  running kube-scheduler && return
  local bin="$tools_dir/kubernetes-$K8S_VERSION/kube-scheduler"
  [ -x "$bin" ] || die "kube-scheduler not built: run scripts/install-tools"
  log "starting kube-scheduler"
  spawn kube-scheduler "$bin" --kubeconfig "$node_dir/scheduler.kubeconfig" \
    --authentication-kubeconfig "$node_dir/scheduler.kubeconfig" \
    --authorization-kubeconfig "$node_dir/scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port 10259 --v 1
  wait_for kube-scheduler 30 curl -fsSk https://127.0.0.1:10259/healthz
}

start_kube_proxy() {
  step="start kube-proxy"
  running kube-proxy && return
  local bin="$tools_dir/kubernetes-$K8S_VERSION/kube-proxy"
  [ -x "$bin" ] || die "kube-proxy not built: run scripts/install-tools"
  log "starting kube-proxy (iptables)"
  spawn kube-proxy "$bin" --config "$node_dir/kube-proxy.yaml" --v 1
  wait_for kube-proxy 30 curl -fsS http://127.0.0.1:10256/healthz
}

# The cluster's DNS: CoreDNS as a pod from its scratch image, answering cluster names only.
start_coredns() {
  step="start CoreDNS"
  kubectl --kubeconfig "$kubeconfig" apply --server-side --field-manager chimera-dev-env -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: chimera-dev:coredns}
rules:
  - apiGroups: [""]
    resources: [services, namespaces, pods]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: chimera-dev:coredns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: chimera-dev:coredns}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
        }
        cache 10
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: coredns
          image: $coredns_image
          imagePullPolicy: Never
          ports:
            - {name: dns, containerPort: 1053, protocol: UDP}
            - {name: dns-tcp, containerPort: 1053, protocol: TCP}
          readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
          livenessProbe: {httpGet: {path: /health, port: 8080}}
          resources:
            requests: {cpu: 20m, memory: 32Mi}
            limits: {memory: 128Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts: [{name: config, mountPath: /etc/coredns}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_ip
  selector: {k8s-app: kube-dns}
  ports:
    - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
    - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
EOF
  kubectl --kubeconfig "$kubeconfig" -n kube-system rollout status deployment/coredns --timeout=60s >/dev/null \
    || die "CoreDNS did not become ready; kubectl -n kube-system describe pod -l k8s-app=kube-dns"
}

# The host's servers as Services in namespace chimera-dev, the way a cluster reaches a managed
# broker or database: a Service without selector and an EndpointSlice to the bridge address.
host_services() {
  step="publish the host's servers as Services (namespace chimera-dev)"
  local rabbitmq=""
  # An external broker (CHIMERA_AMQP_URL) is reached at its own address, not through the bridge.
  if [ -f "$state/rabbitmq.pid" ]; then
    rabbitmq=$(host_service rabbitmq amqp 5672 "$amqp_port" management 15672 "$mgmt_port")
  fi
  kubectl --kubeconfig "$kubeconfig" apply --server-side --field-manager chimera-dev-env -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: chimera-dev}
$rabbitmq
$(host_service mariadb mysql 3306 "$mariadb_port")
EOF
}

host_service() { # host_service NAME (PORT_NAME PORT TARGET)...
  local name=$1
  shift
  local ports="" endpoints=""
  while [ $# -gt 0 ]; do
    ports+="    - {name: $1, port: $2, targetPort: $3, protocol: TCP}"$'\n'
    endpoints+="  - {name: $1, port: $3, protocol: TCP}"$'\n'
    shift 3
  done
  cat <<EOF
---
apiVersion: v1
kind: Service
metadata: {name: $name, namespace: chimera-dev}
spec:
  ports:
$ports---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $name-host
  namespace: chimera-dev
  labels: {kubernetes.io/service-name: $name, endpointslice.kubernetes.io/managed-by: chimera-dev-env}
addressType: IPv4
endpoints: [{addresses: ["$node_ip"], conditions: {ready: true}}]
ports:
$endpoints
EOF
}

node_up() {
  record_host_state
  make_node_certs
  write_node_config
  start_containerd
  node_images
  start_scheduler
  start_kubelet
  start_kube_proxy
  start_coredns
  host_services
}

# --- down ---------------------------------------------------------------------------------------

# Lines of "undo: what" for each change that could not be undone; down prints them.
node_leftovers=()
undo() { # undo WHAT COMMAND...: runs COMMAND, remembering WHAT when it fails
  local what=$1
  shift
  "$@" >/dev/null 2>&1 || node_leftovers+=("$what")
}

# The node's cgroups, deepest last: <hierarchy>/chimera-dev on cgroup v1, /chimera-dev on v2.
node_cgroups() {
  find "$cgroup_root" -maxdepth 2 -type d -name "$cgroup_name" 2>/dev/null
}

kill_pod_processes() {
  # Every process of a pod lives below the kubelet's cgroup root.
  local dir pid
  for dir in $(node_cgroups); do
    for pid in $(find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null || true); do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
}

remove_cgroups() {
  local root dir
  for root in $(node_cgroups); do
    # Deepest first: a cgroup is removed only once empty of children.
    while IFS= read -r dir; do rmdir "$dir" 2>/dev/null || true; done \
      < <(find "$root" -depth -type d 2>/dev/null)
    [ ! -d "$root" ] || node_leftovers+=("cgroup $root (still has processes)")
  done
}

# The pods' network namespaces: those whose veth peers hang on our bridge.
remove_pod_netns() {
  local ns
  for ns in $(ip -o link show master "$node_bridge" 2>/dev/null | { grep -o 'link-netns [^ ]*' || true; } | cut -d' ' -f2 | sort -u); do
    undo "network namespace $ns" ip netns delete "$ns"
  done
}

# mounts_under DIR: the mount points below DIR (as the kernel names them: DIR resolved).
mounts_under() {
  local dir
  dir=$(realpath -m "$1")
  awk -v dir="$dir/" 'index($2, dir) == 1 {print $2}' /proc/self/mounts | sort -r
}

unmount_under() { # unmount_under DIR: every mount below DIR, deepest first
  local mount
  while IFS= read -r mount; do
    undo "mount $mount" umount -l "$mount"
  done < <(mounts_under "$1")
}

# remove_chain TOOL TABLE CHAIN: the rules that jump to CHAIN, then CHAIN itself (TOOL:
# iptables or ip6tables).
remove_chain() {
  local tool=$1 table=$2 chain=$3 rule
  command -v "$tool" >/dev/null 2>&1 || return 0
  "$tool" -w -t "$table" -n -L "$chain" >/dev/null 2>&1 || return 0
  while IFS= read -r rule; do
    # shellcheck disable=SC2086 # a rule as iptables -S prints it: one word per argument
    "$tool" -w -t "$table" -D ${rule#-A } 2>/dev/null || true
  done < <("$tool" -w -t "$table" -S | grep -E -- "^-A .* -j $chain( |\$)" || true)
  "$tool" -w -t "$table" -F "$chain" 2>/dev/null || true
  undo "$tool chain $table/$chain" "$tool" -w -t "$table" -X "$chain"
}

remove_iptables() {
  local bin="$tools_dir/kubernetes-$K8S_VERSION/kube-proxy"
  # kube-proxy removes every rule and chain it made.
  [ ! -x "$bin" ] || undo "kube-proxy's iptables rules (kube-proxy --cleanup failed)" "$bin" --cleanup
  remove_chain iptables filter "$iptables_chain"
  # The kubelet's own chains, IPv4 and IPv6.
  local tool table chain
  for tool in iptables ip6tables; do
    for table in mangle nat filter; do
      for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do remove_chain "$tool" "$table" "$chain"; done
    done
  done
}

restore_sysctls() {
  [ -f "$node_dir/sysctls" ] || return 0
  local key value
  while read -r key value; do
    [ "$(cat "$proc_sys/$key" 2>/dev/null)" = "$value" ] && continue
    if ! echo "$value" >"$proc_sys/$key" 2>/dev/null; then node_leftovers+=("sysctl $key (was $value)"); fi
  done <"$node_dir/sysctls"
}

remove_created_paths() {
  [ -f "$node_dir/created-paths" ] || return 0
  local path
  # The kubelet's links to the pods' logs, in a folder that may be the machine's.
  find "$host_root/var/log/containers" -maxdepth 1 -lname "$(realpath -m "$node_dir")/*" -delete 2>/dev/null || true
  while IFS= read -r path; do
    [ -n "$path" ] && [ -e "$path" ] && undo "$path" rm -rf "$path"
  done <"$node_dir/created-paths"
  rm -f "$host_root"/var/lib/cni/results/chimera-dev-* 2>/dev/null || true
}

# node_ran: up set this node up (its record of the host exists): down touches nothing otherwise.
node_ran() { [ -f "$node_dir/sysctls" ]; }

# node_stop: the node's daemons and every pod process.
node_stop() {
  step="stop the node"
  node_ran || return 0
  stop kubelet
  stop kube-proxy
  stop kube-scheduler
  kill_pod_processes
  stop containerd
  # containerd's shims outlive it; ours name its socket.
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $containerd_sock" 2>/dev/null || true
  kill_pod_processes
}

# node_cleanup: undoes every host change (once nothing listens on the bridge any more).
node_cleanup() {
  step="undo the node's host changes"
  node_ran || return 0
  remove_pod_netns
  unmount_under "$node_dir"
  remove_cgroups
  remove_iptables
  restore_sysctls
  if [ ! -f "$node_dir/bridge-existed" ]; then
    if ip link show "$node_bridge" >/dev/null 2>&1; then undo "bridge $node_bridge" ip link delete "$node_bridge"; fi
  else
    [ -f "$node_dir/route-existed" ] || undo "route $service_cidr on $node_bridge" ip route del "$service_cidr" dev "$node_bridge"
    [ -f "$node_dir/address-existed" ] || undo "address $node_ip on $node_bridge" ip addr del "$node_ip/${pod_cidr#*/}" dev "$node_bridge"
  fi
  remove_created_paths
  local leftover
  for leftover in "${node_leftovers[@]}"; do log "could not undo: $leftover"; done
}

node_status() {
  local name
  for name in containerd kubelet kube-scheduler kube-proxy; do
    if running "$name"; then echo "$name: running (pid $(cat "$state/$name.pid"))"; else echo "$name: stopped"; fi
  done
}
