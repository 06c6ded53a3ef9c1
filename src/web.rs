//! The static files the server embeds: the demo client (client port) and the dashboard (admin
//! port), from `web/` at build time.
//!
//! Owns: which paths map to which embedded file and content type. Must not read files at run
//! time (the binary is self-contained).

/// (path, content type, body) served on the admin listener.
pub const ADMIN_ASSETS: &[(&str, &str, &str)] = &[];

/// (path, content type, body) served on the client port for plain GET requests.
pub const CLIENT_ASSETS: &[(&str, &str, &str)] = &[];
