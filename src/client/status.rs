//! `balancer status`: the master's `/status` as a table (or, with `--json`, as it came).

use std::fmt::Write as _;

use anyhow::Context;
use serde::Deserialize;

/// The parts of `/status` the table shows. Unknown fields are ignored and missing ones are
/// blank, so an older or newer master still renders.
#[derive(Debug, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub(crate) listen: String,
    #[serde(default)]
    pub(crate) mode: String,
    /// `tcp` or `http` (absent from masters before `balancer top`).
    #[serde(default)]
    pub(crate) protocol: Option<String>,
    /// The data path's counters (`open`, `accepted`, …).
    #[serde(default)]
    pub(crate) connections: Option<Totals>,
    #[serde(default)]
    pub(crate) workers_wanted: Option<u64>,
    #[serde(default)]
    pub(crate) workers_running: Option<u64>,
    #[serde(default)]
    pub(crate) in_rotation: Option<u64>,
    #[serde(default)]
    pub(crate) workers: Vec<Worker>,
    #[serde(default)]
    pub(crate) upstreams: Option<Upstreams>,
}

/// The master's connection counters, as `balancer top` computes its rates from them.
#[derive(Debug, Deserialize)]
pub struct Totals {
    /// Client connections open now.
    #[serde(default)]
    pub(crate) open: u64,
    /// Client connections accepted since the master started.
    #[serde(default)]
    pub(crate) accepted: u64,
}

/// Remote backends (`--upstream`), when there are any.
#[derive(Debug, Deserialize)]
pub struct Upstreams {
    #[serde(default)]
    pub(crate) backends: Vec<Remote>,
}

/// One remote backend's row.
#[derive(Debug, Deserialize)]
pub struct Remote {
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) addr: String,
    #[serde(default)]
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) checks_passed: u64,
    #[serde(default)]
    pub(crate) checks_failed: u64,
    #[serde(default)]
    pub(crate) connections: u64,
    #[serde(default)]
    pub(crate) reason: String,
}

/// One row.
#[derive(Debug, Deserialize)]
pub struct Worker {
    #[serde(default)]
    pub(crate) slot: u64,
    #[serde(default)]
    pub(crate) pid: u64,
    /// Which instance it is: a replacement in the same slot has a new one, and its counters
    /// start again from zero.
    #[serde(default)]
    pub(crate) instance: Option<u64>,
    #[serde(default)]
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) addr: Option<String>,
    #[serde(default)]
    pub(crate) uptime_secs: Option<u64>,
    #[serde(default)]
    pub(crate) restarts: Option<u64>,
    #[serde(default)]
    pub(crate) last_exit: Option<String>,
    #[serde(default)]
    pub(crate) connections: Option<Connections>,
}

/// A worker's connections while it is in rotation.
#[derive(Debug, Deserialize)]
pub struct Connections {
    #[serde(default)]
    pub(crate) active: u64,
    #[serde(default)]
    pub(crate) total: u64,
}

impl Status {
    /// Parses a `/status` body.
    pub fn parse(body: &str) -> anyhow::Result<Self> {
        serde_json::from_str(body).context("the master's /status is not the JSON expected")
    }

    /// The table: a summary line, then one row per worker.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let num = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "listen {}  mode {}  workers {} wanted, {} running, {} in rotation",
            self.listen,
            self.mode,
            num(self.workers_wanted),
            num(self.workers_running.or(Some(self.workers.len() as u64))),
            num(self.in_rotation)
        );
        let header = [
            "SLOT",
            "PID",
            "STATE",
            "ADDRESS",
            "UPTIME",
            "RESTARTS",
            "ACTIVE",
            "TOTAL",
            "LAST EXIT",
        ];
        let rows: Vec<[String; 9]> = self
            .workers
            .iter()
            .map(|w| {
                let (active, total) = w
                    .connections
                    .as_ref()
                    .map_or(("-".into(), "-".into()), |c| {
                        (c.active.to_string(), c.total.to_string())
                    });
                [
                    w.slot.to_string(),
                    w.pid.to_string(),
                    w.state.clone(),
                    w.addr.clone().unwrap_or_else(|| "-".into()),
                    w.uptime_secs.map_or_else(|| "-".into(), uptime),
                    num(w.restarts),
                    active,
                    total,
                    w.last_exit.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        write_table(&mut out, &header, &rows);
        let remotes = self.upstreams.as_ref().map_or(&[][..], |u| &u.backends[..]);
        if !remotes.is_empty() {
            let header = [
                "UPSTREAM",
                "ADDRESS",
                "STATE",
                "CHECKS OK/FAILED",
                "ACTIVE",
                "REASON",
            ];
            let rows: Vec<[String; 6]> = remotes
                .iter()
                .map(|r| {
                    [
                        r.name.clone(),
                        r.addr.clone(),
                        r.state.clone(),
                        format!("{}/{}", r.checks_passed, r.checks_failed),
                        r.connections.to_string(),
                        r.reason.clone(),
                    ]
                })
                .collect();
            write_table(&mut out, &header, &rows);
        }
        out
    }
}

/// A header and rows in columns as wide as their widest cell; the last column is not padded.
fn write_table<const N: usize>(out: &mut String, header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(header);
    for row in rows {
        line(&row.each_ref().map(String::as_str));
    }
}

/// `3d04h`, `2h05m`, `4m07s`, `9s`.
pub(crate) fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes() {
        assert_eq!(uptime(9), "9s");
        assert_eq!(uptime(247), "4m07s");
        assert_eq!(uptime(7500), "2h05m");
        assert_eq!(uptime(3 * 86_400 + 4 * 3600 + 59), "3d04h");
    }

    #[test]
    fn renders_rows_and_blanks() {
        let s = Status::parse(
            r#"{"listen":"127.0.0.1:80","mode":"proxy","workers_wanted":2,"in_rotation":1,
            "workers":[{"slot":0,"pid":41,"state":"ready","addr":"127.0.0.1:5000","uptime_secs":65,
            "restarts":1,"last_exit":"killed (signal 9)","connections":{"active":2,"total":30}},
            {"slot":1,"pid":42,"state":"starting","future_field":true}]}"#,
        )
        .unwrap();
        let text = s.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].contains("2 wanted, 2 running, 1 in rotation"),
            "{text}"
        );
        assert!(lines[1].starts_with("SLOT  PID  STATE"), "{text}");
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "0",
                "41",
                "ready",
                "127.0.0.1:5000",
                "1m05s",
                "1",
                "2",
                "30",
                "killed",
                "(signal",
                "9)"
            ]
        );
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(row, ["1", "42", "starting", "-", "-", "-", "-", "-", "-"]);
        assert!(Status::parse("not json").is_err());
    }

    #[test]
    fn renders_remote_backends_after_workers() {
        let s = Status::parse(
            r#"{"listen":"127.0.0.1:80","mode":"proxy","workers_wanted":0,"workers":[],
            "upstreams":{"names":[],"backends":[{"name":"app:8080#1","addr":"10.0.0.5:8080",
            "state":"up","checks_passed":7,"checks_failed":1,"connections":3,
            "reason":"first check passed"}]}}"#,
        )
        .unwrap();
        let text = s.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[2].starts_with("UPSTREAM"), "{text}");
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "app:8080#1",
                "10.0.0.5:8080",
                "up",
                "7/1",
                "3",
                "first",
                "check",
                "passed"
            ]
        );
    }
}
