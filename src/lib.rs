//! The `herald` command line as a library: `serve` runs the server
//! (`herald-server`), and the client commands (`channel`, `post`, `follow`,
//! `token`, `brand`, `key`) talk to one, by default the local one whose data
//! directory holds the admin key, token secret and certificate.
//!
//! [`cli::ApiClient`] is the brand HTTP API's client, also used by the load
//! tester.

pub mod cli;
