//! Courier: a thread-per-core messaging server for users signed in on several devices.
//!
//! The codemap and invariants are in README.md (Architecture). Entry point for embedders and
//! tests: [`server::Server::start`] with a [`config::Config`].

pub mod admin;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
mod connection;
mod groups;
pub mod hooks;
pub mod ids;
pub mod metrics;
pub mod msgid;
mod notify;
mod owner;
pub mod protocol;
mod rate;
mod router;
pub mod server;
pub mod settings;
mod shard;
pub mod storage;
mod sync;
mod web;
