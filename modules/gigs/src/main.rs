//! `gigs query` / `gigs worker`: the gigs domain's two heads.

fn main() -> std::process::ExitCode {
    chimera_sdk::head::main(chimera_gigs::module())
}
