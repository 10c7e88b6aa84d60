//! Drawing one frame of `balancer top` from the [`Model`]: a header, the total rate as a
//! sparkline, a row per worker with its own rate line, the remote upstreams when there are
//! any, and a key hint. Only layout and text: every number comes from the model.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, RenderDirection, Row, Sparkline, Table};
use ratatui::Frame;

use super::model::{Model, Series};
use crate::client::status::{uptime, Status};

/// What the header says besides the model: where the master is and how often it is asked.
pub struct Labels<'a> {
    /// The admin endpoint, as given.
    pub admin: &'a str,
    /// The refresh interval, for the "retrying every …" line.
    pub every: &'a str,
}

/// The worker table's columns (the last, the rate line, takes what is left).
const WORKER_COLUMNS: [(&str, u16); 9] = [
    ("SLOT", 4),
    ("PID", 8),
    ("STATE", 10),
    ("ADDRESS", 21),
    ("ACTIVE", 6),
    ("TOTAL", 9),
    ("RESTARTS", 8),
    ("UPTIME", 7),
    ("RATE", 7),
];

/// Draws the whole frame.
pub fn draw(frame: &mut Frame, model: &Model, labels: &Labels) {
    let status = model.status();
    let upstreams = status
        .and_then(|s| s.upstreams.as_ref())
        .map_or(0, |u| u.backends.len());
    let workers = status.map_or(0, |s| s.workers.len());
    let [header, total, workers_area, upstreams_area, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(7),
        Constraint::Min(boxed_rows(workers)),
        Constraint::Length(if upstreams == 0 {
            0
        } else {
            boxed_rows(upstreams)
        }),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, model, labels);
    draw_total(frame, total, model);
    draw_workers(frame, workers_area, model);
    if let Some(s) = status.filter(|_| upstreams > 0) {
        draw_upstreams(frame, upstreams_area, s);
    }
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(" q ", Style::new().add_modifier(Modifier::REVERSED)),
            Span::raw(" quit"),
        ])),
        footer,
    );
}

fn draw_header(frame: &mut Frame, area: Rect, model: &Model, labels: &Labels) {
    let num = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines = Vec::new();
    if let Some(s) = model.status() {
        lines.push(Line::from(vec![
            Span::styled("balancer top", bold),
            Span::raw(format!(
                "  admin {}  listen {}  mode {}  protocol {}",
                labels.admin,
                s.listen,
                s.mode,
                s.protocol.as_deref().unwrap_or("-")
            )),
        ]));
        let running = s.workers_running.unwrap_or(s.workers.len() as u64);
        let rate = model.total().now();
        lines.push(Line::from(vec![
            Span::raw(format!(
                "workers {running} running / {} wanted, {} in rotation   connections {} active, {} total   ",
                num(s.workers_wanted),
                num(s.in_rotation),
                num(s.connections.as_ref().map(|c| c.open)),
                num(s.connections.as_ref().map(|c| c.accepted)),
            )),
            Span::styled(
                format!("{} {}", num(rate), model.unit().per_second()),
                bold,
            ),
        ]));
    }
    if let Some(e) = model.error() {
        lines.push(Line::styled(
            format!(
                "master unreachable: {e} (retrying every {}; last known state shown)",
                labels.every
            ),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

fn draw_total(frame: &mut Frame, area: Rect, model: &Model) {
    let inner_width = usize::from(area.width.saturating_sub(2));
    let series = model.total();
    let title = format!(
        " {} total: now {}, max {} ",
        model.unit().per_second(),
        series
            .now()
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        series.max_of(inner_width)
    );
    frame.render_widget(
        sparkline(series).block(Block::bordered().title(title)),
        area,
    );
}

fn draw_workers(frame: &mut Frame, area: Rect, model: &Model) {
    let block = Block::bordered().title(" workers ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(status) = model.status() else {
        return;
    };
    let table_width: u16 = WORKER_COLUMNS.iter().map(|(_, w)| w + 1).sum();
    let [table_area, lines_area] =
        Layout::horizontal([Constraint::Length(table_width), Constraint::Min(0)]).areas(inner);
    let unit = model.unit().per_second().to_uppercase();
    let header = Row::new(WORKER_COLUMNS.map(|(name, _)| {
        if name == "RATE" {
            unit.clone()
        } else {
            name.to_owned()
        }
    }))
    .style(Style::new().add_modifier(Modifier::BOLD));
    let dash = || "-".to_owned();
    let rows = status.workers.iter().map(|w| {
        let (active, total) = w.connections.as_ref().map_or((dash(), dash()), |c| {
            (c.active.to_string(), c.total.to_string())
        });
        let rate = model.slot(w.slot).and_then(Series::now);
        let style = match w.state.as_str() {
            "ready" => Style::new().fg(Color::Green),
            "starting" | "draining" => Style::new().fg(Color::Yellow),
            _ => Style::new().fg(Color::Red),
        };
        Row::new([
            w.slot.to_string(),
            w.pid.to_string(),
            w.state.clone(),
            w.addr.clone().unwrap_or_else(dash),
            active,
            total,
            w.restarts.map_or_else(dash, |r| r.to_string()),
            w.uptime_secs.map_or_else(dash, uptime),
            rate.map_or_else(dash, |r| r.to_string()),
        ])
        .style(style)
    });
    let table = Table::new(rows, WORKER_COLUMNS.map(|(_, w)| Constraint::Length(w)))
        .header(header)
        .column_spacing(1);
    frame.render_widget(table, table_area);
    if lines_area.width == 0 {
        return;
    }
    frame.render_widget(
        Paragraph::new(Line::styled(
            format!("{} over time", model.unit().per_second()),
            Style::new().add_modifier(Modifier::BOLD),
        )),
        Rect {
            height: 1,
            ..lines_area
        },
    );
    // One line per row of the table, beside it: the table's header takes the first line.
    let ys = lines_area.y.saturating_add(1)..lines_area.bottom();
    for (w, y) in status.workers.iter().zip(ys) {
        if let Some(series) = model.slot(w.slot) {
            let row = Rect {
                y,
                height: 1,
                ..lines_area
            };
            // Each worker's line on the total's scale would flatten the quiet ones; its own
            // maximum shows its shape, and the RATE column gives the number.
            frame.render_widget(sparkline(series).style(Style::new().fg(Color::Cyan)), row);
        }
    }
}

fn draw_upstreams(frame: &mut Frame, area: Rect, status: &Status) {
    let Some(upstreams) = &status.upstreams else {
        return;
    };
    let widths = [
        Constraint::Length(24),
        Constraint::Length(21),
        Constraint::Length(10),
        Constraint::Length(16),
        Constraint::Length(7),
        Constraint::Min(10),
    ];
    let header = Row::new([
        "UPSTREAM",
        "ADDRESS",
        "STATE",
        "CHECKS OK/FAILED",
        "ACTIVE",
        "REASON",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = upstreams.backends.iter().map(|r| {
        Row::new([
            r.name.clone(),
            r.addr.clone(),
            r.state.clone(),
            format!("{}/{}", r.checks_passed, r.checks_failed),
            r.connections.to_string(),
            r.reason.clone(),
        ])
    });
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(" remote upstreams "));
    frame.render_widget(table, area);
}

/// Lines a bordered table of `rows` rows needs: its header and two borders besides.
fn boxed_rows(rows: usize) -> u16 {
    u16::try_from(rows).unwrap_or(u16::MAX).saturating_add(3)
}

/// A sparkline of `series` with the newest rate at the right edge.
fn sparkline(series: &Series) -> Sparkline<'static> {
    Sparkline::default()
        .data(series.newest_first())
        .direction(RenderDirection::RightToLeft)
        .style(Style::new().fg(Color::Green))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::client::top::model::Sample;

    fn screen(model: &Model) -> String {
        screen_of(model, 140, 30)
    }

    fn screen_of(model: &Model, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        let labels = Labels {
            admin: "/run/b.sock",
            every: "1s",
        };
        terminal.draw(|f| draw(f, model, &labels)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn draws_header_rows_upstreams_and_the_unreachable_line() {
        let doc = |total: u64| {
            Status::parse(&format!(
                r#"{{"listen":"127.0.0.1:8080","mode":"proxy","protocol":"tcp","workers_wanted":2,
                "workers_running":1,"in_rotation":1,"connections":{{"open":3,"accepted":{total}}},
                "workers":[{{"slot":0,"pid":4242,"instance":1,"state":"ready","addr":"127.0.0.1:5000",
                "uptime_secs":65,"restarts":1,"connections":{{"active":3,"total":{total}}}}}],
                "upstreams":{{"backends":[{{"name":"app:80#1","addr":"127.0.0.9:80","state":"up",
                "checks_passed":4,"checks_failed":0,"connections":2,"reason":"first check passed"}}]}}}}"#
            ))
            .unwrap()
        };
        let t0 = Instant::now();
        let mut model = Model::default();
        model.observe(Sample {
            at: t0,
            status: doc(10),
            requests: None,
        });
        model.observe(Sample {
            at: t0 + Duration::from_secs(1),
            status: doc(25),
            requests: None,
        });
        let text = screen(&model);
        assert!(
            text.contains("listen 127.0.0.1:8080  mode proxy  protocol tcp"),
            "{text}"
        );
        assert!(
            text.contains("workers 1 running / 2 wanted, 1 in rotation"),
            "{text}"
        );
        assert!(
            text.contains("connections 3 active, 25 total   15 conn/s"),
            "{text}"
        );
        assert!(text.contains("conn/s total: now 15, max 15"), "{text}");
        let row = text
            .lines()
            .find(|l| l.contains("4242"))
            .expect("the worker row");
        let cells: Vec<&str> = row
            .trim_matches(|c: char| c == '│' || c.is_whitespace())
            .split_whitespace()
            .collect();
        assert_eq!(
            &cells[..9],
            [
                "0",
                "4242",
                "ready",
                "127.0.0.1:5000",
                "3",
                "25",
                "1",
                "1m05s",
                "15"
            ],
            "{text}"
        );
        assert!(text.contains("app:80#1"), "{text}");
        assert!(text.contains("first check passed"), "{text}");
        assert!(!text.contains("unreachable"), "{text}");

        model.unreachable("no master at /run/b.sock (no such socket)".into());
        let text = screen(&model);
        assert!(
            text.contains("master unreachable: no master at /run/b.sock (no such socket)"),
            "{text}"
        );
        assert!(text.contains("4242"), "the last known rows stay: {text}");
    }

    #[test]
    fn any_terminal_size_and_more_workers_than_fit_draw_without_panicking() {
        let workers: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    r#"{{"slot":{i},"pid":{},"instance":{i},"state":"ready","connections":{{"active":1,"total":{i}}}}}"#,
                    1000 + i
                )
            })
            .collect();
        let doc = || {
            Status::parse(&format!(
                r#"{{"listen":"127.0.0.1:1","mode":"proxy","protocol":"tcp","workers":[{}]}}"#,
                workers.join(",")
            ))
            .unwrap()
        };
        // Two polls, so that every slot has a rate line to draw.
        let t0 = Instant::now();
        let mut model = Model::default();
        for at in [t0, t0 + Duration::from_secs(1)] {
            model.observe(Sample {
                at,
                status: doc(),
                requests: None,
            });
        }
        assert!(model.slot(199).is_some());
        model.unreachable("x".repeat(500));
        for (w, h) in [(1, 1), (10, 3), (40, 8), (80, 24), (300, 100)] {
            let text = screen_of(&model, w, h);
            assert_eq!(text.lines().count(), usize::from(h));
        }
    }
}
