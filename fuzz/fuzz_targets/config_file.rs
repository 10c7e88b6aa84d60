//! Fuzzes the `--config FILE` loader: the file's text through `config_file::merge` (the
//! TOML parse, key → flag mapping, clap's parse of every key alone and of the merged
//! command line, and the placing of validation errors at their line), then the whole
//! `Config::try_from` validation of what it returns, as `main` runs them.
//!
//! Input: the file's text (not UTF-8: skipped, `read_to_string` refuses it before the
//! loader sees it). Each input is merged under two command lines: `--config` alone, and
//! `--config` with a flag and a worker command of its own, so the paths where the command
//! line wins over the file run too.
//!
//! Checks besides "no panic": every error is one non-empty line (`{:#}`, as `main` prints
//! it), and every error of the loader names the file.
//!
//! How the loader is linked: the `balancer` package is a binary with no library target,
//! and its modules use each other through `crate::`. This target is therefore the crate
//! root of the loader's own modules, included by `#[path]` from `src/` (the loader, the
//! flags, validation, and what validation uses: health, endpoint, privilege, protocol,
//! upstream),
//! so `crate::cli::Cli` here is the real one. Chosen over a `[lib]` target in the root
//! package (every module would be compiled twice, as lib and bin, with the bin's
//! dead-code analysis changed, in a crate other engineers are editing) and over moving
//! the loader into a leaf module (it is built on clap's `Cli` definition, so it cannot be
//! free of `crate::`). The one change in `src/` is `config_file::merge`, the loader after
//! the file read, so no temporary file is written per input. If a module in this list
//! starts using another `crate::` module, this target fails to build: add it here.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/cli.rs"]
mod cli;
#[path = "../../src/config.rs"]
mod config;
#[path = "../../src/config_file.rs"]
mod config_file;
#[path = "../../src/endpoint.rs"]
mod endpoint;
#[path = "../../src/health.rs"]
mod health;
#[path = "../../src/privilege.rs"]
mod privilege;
#[path = "../../src/protocol.rs"]
mod protocol;
#[path = "../../src/upstream/mod.rs"]
mod upstream;

use std::ffi::OsString;
use std::path::Path;

use clap::CommandFactory;
use libfuzzer_sys::fuzz_target;

/// The name errors give the file.
const FILE: &str = "fuzz.toml";

fn args(extra: &[&str]) -> Vec<OsString> {
    ["balancer", "--config", FILE]
        .iter()
        .chain(extra)
        .map(OsString::from)
        .collect()
}

fn one_line(what: &str, e: &anyhow::Error) -> String {
    let said = format!("{e:#}");
    assert!(!said.is_empty(), "{what}: empty error");
    assert!(!said.contains('\n'), "{what}: error of more than one line: {said:?}");
    said
}

fn check(text: &str, extra: &[&str]) {
    let args = args(extra);
    let matches = cli::Cli::command()
        .try_get_matches_from(&args)
        .expect("the fixed command line parses");
    match config_file::merge(&args, &matches, Path::new(FILE), text) {
        Ok(cli) => {
            if let Err(e) = config::Config::try_from(&cli) {
                one_line("validation", &e);
            }
        }
        Err(e) => {
            let said = one_line("loader", &e);
            assert!(said.starts_with(FILE), "loader error not naming the file: {said:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text, &[]);
    check(text, &["--cpus", "2", "--", "true"]);
});
