//! The command line of a module program: `<program> [query|worker] [--help|--version]`.
//!
//! A head is configured by its environment (the head contract, docs/contract.md), not by flags;
//! the command line only names the head, or asks for help or the version. Parsing and the help
//! text are pure, so both are tested without a process.

use chimera_contract::Head;
use chimera_contract::env::{VARIABLES, Variable};

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run a head: the one named, or the one `CHIMERA_HEAD` names when `None`.
    Run(Option<String>),
    /// Print the help of the program (`None`) or of one head, and exit 0.
    Help(Option<Head>),
    /// Print the version and exit 0.
    Version,
    /// A command line that means nothing: print the reason and the usage, exit 2.
    Invalid(String),
}

/// Reads the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Invocation {
    let args: Vec<String> = args.into_iter().collect();
    let is_help = |a: &str| matches!(a, "--help" | "-h" | "help");
    let is_version = |a: &str| matches!(a, "--version" | "-V");
    let head = |a: &str| a.parse::<Head>().ok();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => Invocation::Run(None),
        [a] if is_help(a) => Invocation::Help(None),
        [a] if is_version(a) => Invocation::Version,
        [h] if head(h).is_some() => Invocation::Run(Some((*h).to_owned())),
        [h, a] if head(h).is_some() && is_help(a) => Invocation::Help(head(h)),
        [h, a] if head(h).is_some() && is_version(a) => Invocation::Version,
        [a, ..] if a.starts_with('-') => Invocation::Invalid(format!("unknown option {a:?}")),
        [h] => Invocation::Invalid(format!("unknown head {h:?}: expected `query` or `worker`")),
        [h, rest @ ..] if head(h).is_some() => Invocation::Invalid(format!(
            "unexpected arguments after `{h}`: {rest:?} (a head reads its settings from the environment)"
        )),
        [h, ..] => Invocation::Invalid(format!("unknown head {h:?}: expected `query` or `worker`")),
    }
}

/// Who the program is, for its help and version.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// The program's name, e.g. `users`.
    pub name: &'static str,
    /// The program's version.
    pub version: &'static str,
    /// One line on what the module does.
    pub about: &'static str,
}

/// `users 0.1.0 (chimera-sdk 0.1.0)`.
pub fn version(program: &Program) -> String {
    format!(
        "{} {} (chimera-sdk {})\n",
        program.name,
        program.version,
        env!("CARGO_PKG_VERSION")
    )
}

/// The short usage, printed after a command-line error.
pub fn usage(program: &Program) -> String {
    format!(
        "usage: {0} query|worker   (or {0} --help, {0} <head> --help, {0} --version)\n",
        program.name
    )
}

/// The help of the program, or of one head: what each head does and the environment it reads.
pub fn help(program: &Program, head: Option<Head>) -> String {
    let mut text = format!("{}: {}\n\n", program.name, program.about);
    let heads: Vec<Head> = Head::ALL
        .into_iter()
        .filter(|h| head.is_none_or(|only| only == *h))
        .collect();
    text.push_str(&format!(
        "usage: {} {}\n\n",
        program.name,
        head.map_or("query|worker", Head::as_str)
    ));
    for &kind in &heads {
        text.push_str(match kind {
            Head::Query => {
                "  query   serves the domain's REST reads from its database, with /healthz, /readyz\n          and /metrics on CHIMERA_HTTP_ADDR\n"
            }
            Head::Worker => {
                "  worker  consumes the domain's commands and subscribed events from its queue, writes\n          the database, publishes the domain's events; /healthz, /readyz, /metrics\n"
            }
        });
    }
    text.push_str(
        "\nThe head is named on the command line or by CHIMERA_HEAD. Settings come from the\nenvironment, which the operator (in a pod) or `chimera up` (locally) sets:\n\n",
    );
    let shown = VARIABLES
        .iter()
        .filter(|v| head.is_none_or(|kind| applies_to(v, kind)));
    let width = VARIABLES.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for v in shown {
        text.push_str(&format!(
            "  {:<width$}  {:<8} {}{}\n",
            v.name,
            heads_label(v),
            v.meaning,
            if v.required { " (required)" } else { "" },
        ));
    }
    text.push_str(
        "\nSIGTERM or Ctrl-C drains the head and stops it. The whole contract: docs/contract.md\n",
    );
    text
}

fn heads_label(v: &Variable) -> &'static str {
    if v.worker_only { "worker" } else { "both" }
}

fn applies_to(v: &Variable, head: Head) -> bool {
    !v.worker_only || head == Head::Worker
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Invocation {
        parse(line.split_whitespace().map(str::to_owned))
    }

    const PROGRAM: Program = Program {
        name: "users",
        version: "1.2.3",
        about: "the users domain",
    };

    #[test]
    fn the_command_line_names_a_head_or_asks_for_help_or_the_version() {
        assert_eq!(args(""), Invocation::Run(None));
        assert_eq!(args("query"), Invocation::Run(Some("query".into())));
        assert_eq!(args("worker"), Invocation::Run(Some("worker".into())));
        for help in ["--help", "-h", "help"] {
            assert_eq!(args(help), Invocation::Help(None));
            assert_eq!(
                args(&format!("worker {help}")),
                Invocation::Help(Some(Head::Worker))
            );
        }
        assert_eq!(args("--version"), Invocation::Version);
        assert_eq!(args("-V"), Invocation::Version);
        assert_eq!(args("query --version"), Invocation::Version);
    }

    #[test]
    fn a_meaningless_command_line_says_what_is_wrong() {
        for (line, says) in [
            ("--verbose", "unknown option \"--verbose\""),
            ("reader", "unknown head \"reader\""),
            ("reader --help", "unknown head \"reader\""),
            ("query --port 80", "unexpected arguments after `query`"),
        ] {
            match args(line) {
                Invocation::Invalid(reason) => assert!(reason.contains(says), "{line}: {reason}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn help_lists_the_heads_and_every_variable_they_read() {
        let all = help(&PROGRAM, None);
        assert!(all.starts_with("users: the users domain"), "{all}");
        assert!(
            all.contains("  query ") && all.contains("  worker "),
            "{all}"
        );
        assert!(all.contains("docs/contract.md"), "{all}");
        for v in VARIABLES {
            assert!(all.contains(v.name), "{} missing from\n{all}", v.name);
        }
        let query = help(&PROGRAM, Some(Head::Query));
        assert!(query.contains("CHIMERA_AMQP_URL") && !query.contains("CHIMERA_WORKER_QUEUE"));
        assert!(!query.contains("  worker "), "{query}");
        let worker = help(&PROGRAM, Some(Head::Worker));
        assert!(worker.contains("CHIMERA_WORKER_QUEUE") && worker.contains("CHIMERA_PREFETCH"));
    }

    #[test]
    fn version_names_the_program_and_the_sdk() {
        let v = version(&PROGRAM);
        assert!(v.starts_with("users 1.2.3 (chimera-sdk "), "{v}");
    }
}
