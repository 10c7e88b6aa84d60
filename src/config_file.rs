//! `--config FILE`: a TOML file whose keys are the master's long flags (`listen`, `cpus`,
//! `ready-timeout` or `ready_timeout`, `command = ["node", "app.js"]`, …).
//!
//! The file is not a second schema: its keys are read off clap's own [`Cli`] definition, and
//! each entry becomes the flag it names, parsed by clap exactly as if typed. A flag added to
//! `Cli` is a key at once, with the same type and the same validation. Precedence: the
//! command line, then the environment (`BALANCER_*`), then the file, then the defaults.
//!
//! Errors name the key and the file's line: an unknown key, a value of the wrong TOML type
//! for its flag (a list for a one-value flag, a string for a switch), or a value clap
//! refuses. An error about several flags (a conflict, `--ready port` with `--mode shared`)
//! names every key of the file it mentions, each with its line; keys are read in the file's
//! order, so the error reported is the file's first. Hand-written because clap has no config-file layer and the toml crate knows
//! nothing of clap; the mapping is about a hundred lines.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::cli::Cli;

/// Flags that are not keys: the file's own path, and what only makes sense typed.
const NOT_KEYS: [&str; 4] = ["config", "check", "help", "version"];
/// The positional worker command's key.
const COMMAND: &str = "command";

/// Parses `args` (the whole command line, program name first) and, when it names
/// `--config FILE`, merges the file under it. Clap's own errors (an unknown flag, `--help`)
/// exit as clap does; errors of the file are returned, one line each.
pub fn parse(args: &[OsString]) -> anyhow::Result<Cli> {
    let matches = Cli::command().get_matches_from(args);
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Cli::from_arg_matches(&matches).map_err(one_line);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    merge(args, &matches, &path, &text)
}

/// The rest of [`parse`] once the file is read: `text` (read from `path`, which errors
/// name) merged under `args`, whose clap `matches` the caller has. Separate from the read
/// so the fuzz target (`fuzz/fuzz_targets/config_file.rs`) drives it with no file.
pub fn merge(
    args: &[OsString],
    matches: &ArgMatches,
    path: &Path,
    text: &str,
) -> anyhow::Result<Cli> {
    let mut from_file = file_args(path, text, matches)?;
    let mut merged: Vec<OsString> = args.iter().take(1).cloned().collect();
    merged.extend(from_file.flags.drain(..).map(OsString::from));
    merged.extend(args.iter().skip(1).cloned());
    if let Some(command) = from_file.command.take() {
        merged.push("--".into());
        merged.extend(command.into_iter().map(OsString::from));
    }
    let cli = Cli::command()
        .try_get_matches_from(&merged)
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(|e| {
            let said = format!("{}", one_line(e));
            match from_file.keys_in(&said) {
                Some(keys) => anyhow::anyhow!("{}: {keys}: {said}", path.display()),
                None => anyhow::anyhow!("{}: {said}", path.display()),
            }
        })?;
    // Validation names the flag and quotes its value: when that value came from the file,
    // say where. Any other error is left for the caller's own validation to report.
    if let Err(e) = crate::config::Config::try_from(&cli) {
        let said = format!("{e:#}");
        if let Some((_, at, key)) = from_file
            .located
            .iter()
            .find(|(q, _, _)| said.starts_with(q.as_str()))
        {
            bail!("{at}: key `{key}`: {said}");
        }
        // An error about several flags (`--ready port is for --mode proxy …`): name every
        // key of the file it mentions, each with its line.
        if let Some(keys) = from_file.keys_in(&said) {
            bail!("{}: {keys}: {said}", path.display());
        }
    }
    Ok(cli)
}

/// What the file adds to the command line.
#[derive(Debug, Default)]
struct FileArgs {
    /// `--flag=value` pieces, for keys not given on the command line or in the environment.
    flags: Vec<String>,
    /// The worker command, unless the command line has one.
    command: Option<Vec<String>>,
    /// `(--flag "value", where, key)` of each one-value key, to place the validation error
    /// that quotes it (`--grace "soon": ...`) at its line.
    located: Vec<(String, String, String)>,
    /// `(flag name, key as written, line)` of every key the file contributed.
    keys: Vec<(String, String, usize)>,
}

impl FileArgs {
    /// The file's keys whose flag `message` names (`--mode`, not `--mode-x`), as
    /// ``key `mode` (line 2)`` or ``keys `ready` (line 1), `mode` (line 2)``; `None` when
    /// it names none of them.
    fn keys_in(&self, message: &str) -> Option<String> {
        let mut named: Vec<&(String, String, usize)> = (self.keys.iter())
            .filter(|(name, _, _)| mentions(message, name))
            .collect();
        named.sort_by_key(|(_, _, line)| *line);
        let named: Vec<String> = (named.iter())
            .map(|(_, key, line)| format!("`{key}` (line {line})"))
            .collect();
        match named.as_slice() {
            [] => None,
            [one] => Some(format!("key {one}")),
            many => Some(format!("keys {}", many.join(", "))),
        }
    }
}

/// Whether `message` names flag `--name` (or the positional command) as a whole word.
fn mentions(message: &str, name: &str) -> bool {
    if name == COMMAND {
        return message.contains("COMMAND");
    }
    let flag = format!("--{name}");
    message.match_indices(&flag).any(|(at, _)| {
        !message[at + flag.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

fn file_args(path: &Path, text: &str, given: &ArgMatches) -> anyhow::Result<FileArgs> {
    let table = DeTable::parse(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start));
        anyhow::anyhow!("{} line {line}: {}", path.display(), e.message().trim())
    })?;
    let command = Cli::command();
    let mut out = FileArgs::default();
    let mut seen: Vec<String> = Vec::new();
    // In the file's order, so the error reported is the first one in the file.
    let mut entries: Vec<_> = table.get_ref().iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    for (key, value) in entries {
        let line = line_of(text, key.span().start);
        let at = || format!("{} line {line}", path.display());
        let name = key.get_ref().replace('_', "-");
        // As errors show it: a quoted TOML key may hold a newline, and errors are one line
        // (found by fuzz/fuzz_targets/config_file.rs).
        let shown = key.get_ref().escape_debug().to_string();
        if matches!(value.get_ref(), DeValue::Table(_)) {
            bail!(
                "{}: key `{}`: found a table; keys are flags, with no sections",
                at(),
                shown
            );
        }
        let arg = command
            .get_arguments()
            .find(|a| {
                !NOT_KEYS.contains(&a.get_id().as_str())
                    && !a.is_hide_set()
                    && (a.get_long() == Some(name.as_str())
                        || (a.is_positional() && a.get_id() == COMMAND && name == COMMAND))
            })
            .with_context(|| format!("{}: unknown key `{}`", at(), shown))?;
        if seen.contains(&name) {
            bail!("{}: key `{}` given twice", at(), shown);
        }
        seen.push(name.clone());
        let id = arg.get_id().as_str();
        if matches!(
            given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let values = to_strings(value)
            .map_err(|found| anyhow::anyhow!("{}: key `{}`: {found}", at(), shown))?;
        let pieces = pieces(&name, arg.get_action(), arg.is_positional(), values)
            .map_err(|why| anyhow::anyhow!("{}: key `{}`: {why}", at(), shown))?;
        out.keys.push((name.clone(), shown.clone(), line));
        if arg.is_positional() {
            out.command = Some(pieces);
            continue;
        }
        // Each key alone through clap and validation, so a value they refuse is reported
        // at its line (an error about other flags is left for the whole configuration).
        let mut alone = vec!["balancer".to_owned()];
        alone.extend(pieces.iter().cloned());
        if let Err(e) = Cli::command().try_get_matches_from(&alone) {
            // A flag that needs or excludes another (`tls-cert` needs `tls-key`) is judged
            // with the whole file, below; anything else is this key's own error.
            use clap::error::ErrorKind;
            if !matches!(
                e.kind(),
                ErrorKind::MissingRequiredArgument | ErrorKind::ArgumentConflict
            ) {
                bail!("{}: key `{}`: {}", at(), shown, one_line(e));
            }
        }
        if let [piece] = pieces.as_slice() {
            if let Some((_, value)) = piece.split_once('=') {
                out.located
                    .push((format!("--{name} {value:?}"), at(), shown.clone()));
            }
        }
        out.flags.extend(pieces);
    }
    Ok(out)
}

/// A TOML value as flag values: scalars as text; a list as one value per element.
enum Values {
    One(String),
    Bool(bool),
    Many(Vec<String>),
}

fn to_strings(value: &Spanned<DeValue<'_>>) -> Result<Values, String> {
    let scalar = |v: &DeValue<'_>| -> Result<String, String> {
        match v {
            DeValue::String(s) => Ok(s.to_string()),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .map(|n| n.to_string())
                .map_err(|_| format!("integer {i} out of range")),
            DeValue::Float(f) => Ok(f.as_str().to_owned()),
            DeValue::Boolean(_) => Err("found a boolean where a value is expected".into()),
            DeValue::Datetime(_) => Err("found a date where a value is expected".into()),
            DeValue::Array(_) => Err("found a list inside a list".into()),
            DeValue::Table(_) => Err("found a table where a value is expected".into()),
        }
    };
    match value.get_ref() {
        DeValue::Boolean(b) => Ok(Values::Bool(*b)),
        DeValue::Array(items) => items
            .iter()
            .map(|i| scalar(i.get_ref()))
            .collect::<Result<_, _>>()
            .map(Values::Many),
        DeValue::Table(_) => Err("found a table; keys are flags, with no sections".into()),
        v => scalar(v).map(Values::One),
    }
}

/// The command-line pieces for one key, checked against what its flag takes.
fn pieces(
    name: &str,
    action: &ArgAction,
    positional: bool,
    values: Values,
) -> Result<Vec<String>, String> {
    let flag = format!("--{name}");
    Ok(match (action, values) {
        (ArgAction::SetTrue, Values::Bool(true)) => vec![flag],
        (ArgAction::SetTrue, Values::Bool(false)) => vec![],
        (ArgAction::SetTrue, _) => return Err("expected true or false".into()),
        (ArgAction::Count, Values::One(n)) => {
            let n: usize = n.parse().map_err(|_| "expected a count (0, 1, 2)")?;
            vec![flag; n.min(8)]
        }
        (ArgAction::Count, Values::Bool(b)) => vec![flag; usize::from(b)],
        (ArgAction::Count, Values::Many(_)) => return Err("expected a count (0, 1, 2)".into()),
        (_, Values::Bool(_)) => return Err("found a boolean where a value is expected".into()),
        (ArgAction::Append, Values::Many(items)) if positional => items,
        (ArgAction::Append, Values::One(_)) if positional => {
            return Err("expected a list (e.g. [\"node\", \"app.js\"])".into())
        }
        (ArgAction::Append, Values::Many(items)) => {
            items.into_iter().map(|v| format!("{flag}={v}")).collect()
        }
        (_, Values::One(v)) => vec![format!("{flag}={v}")],
        (_, Values::Many(_)) => return Err("found a list; this flag takes one value".into()),
    })
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |before| before.bytes().filter(|&b| b == b'\n').count())
        + 1
}

/// Clap's message without its `error: ` prefix, usage and hints: one line.
fn one_line(e: clap::Error) -> anyhow::Error {
    let text = e.to_string();
    // The message may go on over a few lines (`required arguments were not provided:` then
    // the flags); the usage and tips come after a blank line.
    let message: Vec<&str> = (text.lines())
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    let first = match message.join(" ") {
        m if m.is_empty() => "invalid arguments".to_owned(),
        m => m,
    };
    anyhow::anyhow!("{}", first.strip_prefix("error: ").unwrap_or(&first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with(file: &str, args: &[&str]) -> anyhow::Result<Cli> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "balancer-config-test-{}-{n}.toml",
            std::process::id()
        ));
        std::fs::write(&path, file).unwrap();
        let mut all: Vec<OsString> =
            vec!["balancer".into(), "--config".into(), path.clone().into()];
        all.extend(args.iter().map(OsString::from));
        let cli = parse(&all);
        let _ = std::fs::remove_file(&path);
        cli
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let cli = parse_with(
            "listen = \"127.0.0.1:8080\"\ncpus = 3\nready_timeout = \"2s\"\nhealth-rise = 4\n\
             balance = \"least-conn\"\ncommand = [\"sh\", \"-c\", \"exit 0\"]\nverbose = 1\n",
            &["--cpus", "2"],
        )
        .unwrap();
        assert_eq!(cli.listen, "127.0.0.1:8080");
        assert_eq!(cli.cpus, "2", "the command line overrides the file");
        assert_eq!(cli.ready_timeout, "2s");
        assert_eq!(cli.health_rise, 4);
        assert_eq!(cli.balance, crate::cli::BalanceArg::LeastConn);
        assert_eq!(cli.command, ["sh", "-c", "exit 0"]);
        assert_eq!(cli.verbose, 1);
        let cli = parse_with("command = [\"sh\"]\n", &["--", "true"]).unwrap();
        assert_eq!(cli.command, ["true"]);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let err = |file: &str| format!("{:#}", parse_with(file, &[]).unwrap_err());
        let e = err("listen = \":80\"\n\nlisten_addr = \"x\"\n");
        assert!(e.contains("line 3: unknown key `listen_addr`"), "{e}");
        let e = err("cpus = 2\nhealth-rise = \"many\"\n");
        assert!(
            e.contains("line 2: key `health-rise`") && e.contains("many"),
            "{e}"
        );
        let e = err("listen = [\"a\", \"b\"]\n");
        assert!(e.contains("line 1: key `listen`: found a list"), "{e}");
        let e = err("mode = true\n");
        assert!(e.contains("line 1: key `mode`: found a boolean"), "{e}");
        let e = err("balance = \"fastest\"\n");
        assert!(
            e.contains("line 1: key `balance`") && e.contains("fastest"),
            "{e}"
        );
        let e = err("command = \"node app.js\"\n");
        assert!(e.contains("key `command`: expected a list"), "{e}");
        let e = err("cpus = 2\ncpus = 3\n");
        assert!(e.contains("line 2"), "{e}");
        let e = err("[server]\nlisten = \":80\"\n");
        assert!(e.contains("line 1: key `server`: found a table"), "{e}");
        let e = err("config = \"other.toml\"\n");
        assert!(e.contains("unknown key `config`"), "{e}");
        let e = err("\ngrace = 30\n");
        assert!(e.contains("line 2: key `grace`: --grace \"30\""), "{e}");
        let e = err("\"a\\nb\" = 1\n");
        assert!(e.contains("unknown key `a\\nb`"), "one line: {e}");
        let e = err("verbose = 1\nquiet = 1\n");
        assert!(e.contains("cannot be used with"), "{e}");
        assert!(
            e.contains("keys `verbose` (line 1), `quiet` (line 2)"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    /// An error about several flags names each key of the file it is about, with its line.
    #[test]
    fn errors_about_several_keys_name_each_with_its_line() {
        let err = |file: &str| format!("{:#}", parse_with(file, &[]).unwrap_err());
        let e = err("cpus = 1\nready = \"port\"\nmode = \"shared\"\ncommand = [\"sh\"]\n");
        assert!(
            e.contains("keys `ready` (line 2), `mode` (line 3): --ready port is for --mode proxy"),
            "{e}"
        );
        let e = err("\nsend-proxy = \"v1\"\nmode = \"handoff\"\n");
        assert!(
            e.contains("keys `send-proxy` (line 2), `mode` (line 3)"),
            "{e}"
        );
        // A flag that needs another is judged with the whole file, not alone: clap names
        // only the missing flag.
        let e = err("tls-cert = \"/nonexistent/cert.pem\"\n");
        assert!(
            e.contains("required arguments were not provided: --tls-key"),
            "{e}"
        );
        let both = parse_with("tls-cert = \"/tmp/c.pem\"\ntls-key = \"/tmp/k.pem\"\n", &[]);
        assert!(both.is_ok(), "each needs the other: {both:?}");
        // An error about a flag from the command line names no key of the file (it is the
        // caller's validation that reports it).
        let cli = parse_with("cpus = 2\n", &["--ready", "spawn"]).unwrap();
        let e = format!("{:#}", crate::config::Config::try_from(&cli).unwrap_err());
        assert!(!e.contains("key"), "{e}");
    }

    /// A value of the wrong TOML type for its flag: the key, the line, what was found.
    #[test]
    fn wrong_types_name_the_key_and_line() {
        let err = |file: &str| format!("{:#}", parse_with(file, &[]).unwrap_err());
        for (file, wanted) in [
            ("cpus = true\n", "line 1: key `cpus`: found a boolean"),
            ("\nhealth-rise = 1.5\n", "line 2: key `health-rise`"),
            ("max-conns = -3\n", "line 1: key `max-conns`"),
            (
                "listen = 2026-12-01\n",
                "line 1: key `listen`: found a date",
            ),
            (
                "access-log = \"yes\"\n",
                "line 1: key `access-log`: expected true or false",
            ),
            (
                "command = [[\"a\"]]\n",
                "line 1: key `command`: found a list inside a list",
            ),
            (
                "x = 1\nlisten = { host = \"a\" }\n",
                "line 1: unknown key `x`",
            ),
            (
                "listen = { host = \"a\" }\n",
                "line 1: key `listen`: found a table",
            ),
            (
                "upstream = [1.5, true]\n",
                "line 1: key `upstream`: found a boolean",
            ),
            (
                "verbose = \"loud\"\n",
                "line 1: key `verbose`: expected a count",
            ),
            ("cpus = 99999999999999999999\n", "line 1"),
            ("cpus = \"2\n", "line 1"),
        ] {
            let e = err(file);
            assert!(e.contains(wanted), "{file:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
