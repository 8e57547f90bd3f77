//! `orders query` / `orders worker`: the orders domain's two heads.

fn main() -> std::process::ExitCode {
    chimera_sdk::head::main(chimera_orders::module())
}
