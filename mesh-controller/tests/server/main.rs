//! The real server: real TLS on 127.0.0.1:0 and on a Unix socket, real tonic clients with
//! node tokens, the file source on a temp directory. Every wait has a deadline.

mod fail_closed;
mod harness;
mod robustness;
mod sign;
mod watch;
