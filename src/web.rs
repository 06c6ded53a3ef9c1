//! The static files the server embeds: the demo client (client port) and the dashboard (admin
//! port), from `web/` at build time.
//!
//! Owns: which paths map to which embedded file and content type. Must not read files at run
//! time (the binary is self-contained).

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// (path, content type, body) served on the admin listener.
pub const ADMIN_ASSETS: &[(&str, &str, &str)] = &[
    ("/dashboard", HTML, include_str!("../web/dashboard.html")),
    ("/dashboard.js", JS, include_str!("../web/dashboard.js")),
];

/// (path, content type, body) served on the client port for plain GET requests.
pub const CLIENT_ASSETS: &[(&str, &str, &str)] = &[
    ("/", HTML, include_str!("../web/index.html")),
    ("/index.html", HTML, include_str!("../web/index.html")),
    ("/app.js", JS, include_str!("../web/app.js")),
    ("/style.css", CSS, include_str!("../web/style.css")),
];
