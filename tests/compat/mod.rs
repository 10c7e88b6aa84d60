//! Compatibility (issue 4): Node workers, programs that know nothing of IPC, socket-sharing modes, balance policies.
