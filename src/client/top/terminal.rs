//! The terminal while `balancer top` runs: raw mode, the alternate screen and a hidden
//! cursor, and their undoing on every way out. A [`Screen`] restores the terminal when it is
//! dropped (a normal quit, or an error returned by `?`), and a panic hook restores it
//! before the panic message is printed, because the release profile aborts on panic and
//! runs no destructors.

use std::io::{self, Stdout};
use std::sync::Once;

use anyhow::Context;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::cursor::Show;
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::Terminal;

/// The terminal in `top`'s state, for drawing; the shell's state comes back when dropped.
pub struct Screen {
    /// ratatui's double-buffered terminal: each draw writes only the cells that changed.
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    /// Takes over the terminal. Fails (restoring whatever was already changed) when stdout
    /// is not a terminal.
    pub fn enter() -> anyhow::Result<Self> {
        install_panic_hook();
        terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        // From here on a failure must undo raw mode: `restore` copes with a half-done setup.
        let setup = || -> io::Result<Terminal<CrosstermBackend<Stdout>>> {
            execute!(io::stdout(), EnterAlternateScreen)?;
            let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
            terminal.hide_cursor()?;
            terminal.clear()?;
            Ok(terminal)
        };
        match setup() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                restore();
                Err(e).context("setting up the terminal")
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the terminal back as the shell had it. Errors are ignored: this runs on the way out
/// (often because of another error), and there is nothing better to do about a terminal
/// that cannot be written to.
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
}

/// Chains a hook that restores the terminal in front of the one installed (the default
/// hook prints the message, which would otherwise be lost on the alternate screen or
/// mangled by raw mode). Once per process, however many times `enter` is called.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}
