//! Fault suite (issue 3): the real binary under load while workers, clients and the IPC channel misbehave.
