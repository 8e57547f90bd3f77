//! `users query` / `users worker`: the users domain's two heads.

fn main() -> std::process::ExitCode {
    chimera_sdk::head::main(chimera_users::module())
}
