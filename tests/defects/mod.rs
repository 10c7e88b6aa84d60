//! Defects found by a new user and a hostile client (issue 9): one module per item, each
//! with a test that failed on the code before its fix.

mod drain;
mod early_client;
mod half_close;
mod node_seed;
mod orphans;
mod ready_port;
mod startup;
