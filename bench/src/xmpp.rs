//! The XMPP side of the ejabberd peer: the few stanzas the bench writes, a scanner for the
//! single elements the server sends (RFC 7395 puts exactly one complete element in each
//! WebSocket message, so no streaming parser is needed), and account registration through
//! ejabberd's HTTP API.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The virtual host every bench account lives on (bench/peers/ejabberd.sh serves `localhost`).
pub const DOMAIN: &str = "localhost";
/// Every bench account's password (stored plain by the peer config, checked by SASL PLAIN).
pub const PASSWORD: &str = "courier-bench";
pub const FRAMING_NS: &str = "urn:ietf:params:xml:ns:xmpp-framing";

pub fn open() -> String {
    format!("<open xmlns=\"{FRAMING_NS}\" to=\"{DOMAIN}\" version=\"1.0\"/>")
}

pub fn close() -> String {
    format!("<close xmlns=\"{FRAMING_NS}\"/>")
}

/// SASL PLAIN: base64 of `\0user\0password` (RFC 4616; the authzid is left empty).
pub fn auth_plain(user: &str) -> String {
    let raw = format!("\0{user}\0{PASSWORD}");
    format!(
        "<auth xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\" mechanism=\"PLAIN\">{}</auth>",
        base64(raw.as_bytes())
    )
}

pub fn bind(id: &str, resource: &str) -> String {
    format!(
        "<iq type=\"set\" id=\"{id}\"><bind xmlns=\"urn:ietf:params:xml:ns:xmpp-bind\"><resource>{}</resource></bind></iq>",
        escape(resource)
    )
}

pub fn enable_carbons(id: &str) -> String {
    format!("<iq type=\"set\" id=\"{id}\"><enable xmlns=\"urn:xmpp:carbons:2\"/></iq>")
}

/// Available presence with a positive priority: ejabberd routes a message to a bare JID to
/// every resource of the highest non-negative priority, so equal priorities mean all devices.
pub fn presence() -> String {
    "<presence><priority>1</priority></presence>".to_string()
}

/// XEP-0199 ping to the server; its result comes back after everything sent before it.
pub fn ping(id: &str) -> String {
    format!("<iq type=\"get\" id=\"{id}\" to=\"{DOMAIN}\"><ping xmlns=\"urn:xmpp:ping\"/></iq>")
}

pub fn chat(to_user: &str, id: &str, body: &str) -> String {
    format!(
        "<message type=\"chat\" to=\"{}@{DOMAIN}\" id=\"{}\"><body>{}</body></message>",
        escape(to_user),
        escape(id),
        escape(body)
    )
}

/// One element from the server, reduced to what the bench acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Element {
    /// `<open/>` (stream header).
    Open,
    Features,
    SaslSuccess,
    SaslFailure(String),
    Iq {
        ty: String,
        id: String,
    },
    /// A message stanza; `body` is the first `<body>` inside it at any depth, so a carbon
    /// (`<received><forwarded><message><body>`) yields its forwarded body.
    Message {
        ty: String,
        id: String,
        body: Option<String>,
        /// The defined condition of a `type="error"` message.
        error: Option<String>,
    },
    Presence,
    /// `<close/>` or `<stream:error>`: the server ends the stream.
    Closed(String),
    Other(String),
}

pub fn parse(xml: &str) -> Element {
    let mut toks = Tokens { s: xml, pos: 0 };
    let Some(Tok::Start { name, attrs, .. }) = toks.find(|t| matches!(t, Tok::Start { .. })) else {
        return Element::Other(String::new());
    };
    let ty = attr(attrs, "type").unwrap_or_default();
    let id = attr(attrs, "id").unwrap_or_default();
    match local(name) {
        "open" => Element::Open,
        "features" => Element::Features,
        "success" => Element::SaslSuccess,
        "failure" => Element::SaslFailure(first_child_name(xml).unwrap_or_default()),
        "iq" => Element::Iq { ty, id },
        "message" => {
            let error = (ty == "error").then(|| error_condition(xml).unwrap_or_default());
            Element::Message {
                ty,
                id,
                body: child_text(xml, "body"),
                error,
            }
        }
        "presence" => Element::Presence,
        "close" => Element::Closed("close".into()),
        "error" => Element::Closed(first_child_name(xml).unwrap_or_else(|| "stream error".into())),
        other => Element::Other(other.to_string()),
    }
}

/// The defined condition inside `<error>`: its first child that is not `<text>`.
pub fn error_condition(xml: &str) -> Option<String> {
    let mut toks = Tokens { s: xml, pos: 0 };
    let mut in_error = false;
    for t in toks.by_ref() {
        match t {
            Tok::Start { name, .. } if local(name) == "error" => in_error = true,
            Tok::Start { name, .. } if in_error && local(name) != "text" => {
                return Some(local(name).to_string());
            }
            _ => {}
        }
    }
    None
}

fn first_child_name(xml: &str) -> Option<String> {
    Tokens { s: xml, pos: 0 }
        .filter_map(|t| match t {
            Tok::Start { name, .. } => Some(local(name).to_string()),
            _ => None,
        })
        .nth(1)
}

/// The unescaped text of the first element named `name` (local name) at any depth.
pub fn child_text(xml: &str, name: &str) -> Option<String> {
    let mut toks = Tokens { s: xml, pos: 0 };
    while let Some(t) = toks.next() {
        if let Tok::Start { name: n, empty, .. } = t
            && local(n) == name
        {
            if empty {
                return Some(String::new());
            }
            let mut out = String::new();
            for t in toks.by_ref() {
                match t {
                    Tok::Text(x) => out.push_str(&unescape(x)),
                    Tok::End => return Some(out),
                    Tok::Start { .. } => {}
                }
            }
            return Some(out);
        }
    }
    None
}

fn local(name: &str) -> &str {
    name.rsplit(':').next().unwrap_or(name)
}

enum Tok<'a> {
    Start {
        name: &'a str,
        attrs: &'a str,
        empty: bool,
    },
    /// An end tag; its name is not needed (callers only want the end of the element they are in).
    End,
    Text(&'a str),
}

/// Tags and text of one element. Also steps over `<?...?>`, comments and CDATA, though the
/// server sends none of them in RFC 7395 framing.
struct Tokens<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Tok<'a>;
    fn next(&mut self) -> Option<Tok<'a>> {
        loop {
            let rest = &self.s[self.pos..];
            if rest.is_empty() {
                return None;
            }
            if !rest.starts_with('<') {
                let end = rest.find('<').unwrap_or(rest.len());
                self.pos += end;
                return Some(Tok::Text(&rest[..end]));
            }
            if rest.starts_with("<?") || rest.starts_with("<!--") {
                let close = if rest.starts_with("<?") { "?>" } else { "-->" };
                let end = rest
                    .find(close)
                    .map(|i| i + close.len())
                    .unwrap_or(rest.len());
                self.pos += end;
                continue;
            }
            if let Some(cdata) = rest.strip_prefix("<![CDATA[") {
                let end = cdata.find("]]>").unwrap_or(cdata.len());
                self.pos += 9 + end + 3.min(cdata.len() - end);
                return Some(Tok::Text(&cdata[..end]));
            }
            // The tag ends at the first '>' outside a quoted attribute value ('>' may appear
            // unescaped inside one).
            let mut quote = None;
            let mut end = rest.len();
            for (i, c) in rest.char_indices().skip(1) {
                match (quote, c) {
                    (None, '"' | '\'') => quote = Some(c),
                    (Some(q), c) if c == q => quote = None,
                    (None, '>') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let inner = &rest[1..end];
            self.pos += (end + 1).min(rest.len());
            if inner.starts_with('/') {
                return Some(Tok::End);
            }
            let empty = inner.ends_with('/');
            let inner = inner.strip_suffix('/').unwrap_or(inner);
            let name_end = inner
                .find(|c: char| c.is_ascii_whitespace())
                .unwrap_or(inner.len());
            return Some(Tok::Start {
                name: &inner[..name_end],
                attrs: &inner[name_end..],
                empty,
            });
        }
    }
}

/// The unescaped value of attribute `key` (exact qualified name) in a tag's attribute text.
pub fn attr(attrs: &str, key: &str) -> Option<String> {
    let mut rest = attrs;
    loop {
        rest = rest.trim_start();
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let q = after.chars().next()?;
        if q != '"' && q != '\'' {
            return None;
        }
        let close = after[1..].find(q)?;
        let value = &after[1..1 + close];
        if name == key {
            return Some(unescape(value));
        }
        rest = &after[close + 2..];
    }
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

pub fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut o = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        o.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(semi) = rest.find(';') else { break };
        let ent = &rest[1..semi];
        let c = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => ent
                .strip_prefix("#x")
                .map(|h| u32::from_str_radix(h, 16))
                .or_else(|| ent.strip_prefix('#').map(|d| d.parse::<u32>()))
                .and_then(|r| r.ok())
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                o.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                o.push('&');
                rest = &rest[1..];
            }
        }
    }
    o.push_str(rest);
    o
}

pub fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(b.len().div_ceil(3) * 4);
    for ch in b.chunks(3) {
        let n = (ch[0] as u32) << 16
            | (*ch.get(1).unwrap_or(&0) as u32) << 8
            | *ch.get(2).unwrap_or(&0) as u32;
        for (k, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if k <= ch.len() {
                o.push(A[(n >> shift & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

/// Registers `users` on `DOMAIN` with `PASSWORD` through mod_http_api's `register` command,
/// over `conns` keep-alive HTTP connections. An account that already exists counts as done (a
/// server the bench did not start may hold them from an earlier run). Returns how many were new.
pub async fn register(addr: SocketAddr, users: &[String], conns: usize) -> Result<usize, String> {
    let t = Instant::now();
    let per = users.len().div_ceil(conns.max(1)).max(1);
    let mut tasks = Vec::new();
    for chunk in users.chunks(per) {
        let chunk = chunk.to_vec();
        tasks.push(tokio::task::spawn_local(async move {
            register_some(addr, &chunk).await
        }));
    }
    let mut new = 0;
    for t in tasks {
        new += t.await.map_err(|e| e.to_string())??;
    }
    eprintln!(
        "[ejabberd] {} accounts ready ({new} new) in {:.2}s",
        users.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(new)
}

/// `register` from synchronous code (connect's parent process has no runtime of its own).
pub fn register_blocking(url: &str, users: &[String]) -> Result<usize, String> {
    let addr = crate::conn::addr_of(url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, register(addr, users, 8))
}

async fn register_some(addr: SocketAddr, users: &[String]) -> Result<usize, String> {
    let mut s = connect_retrying(addr).await?;
    let mut new = 0;
    let mut buf = Vec::with_capacity(1024);
    for u in users {
        let body =
            format!("{{\"user\":\"{u}\",\"host\":\"{DOMAIN}\",\"password\":\"{PASSWORD}\"}}");
        let req = format!(
            "POST /api/register HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, text) = match http_roundtrip(&mut s, &req, &mut buf).await {
            Ok(r) => r,
            // The server may close a keep-alive connection: one fresh connection per failure.
            Err(_) => {
                s = connect_retrying(addr).await?;
                http_roundtrip(&mut s, &req, &mut buf).await?
            }
        };
        match status {
            200 => new += 1,
            409 if text.contains("already registered") => {}
            _ => return Err(format!("registering {u}: HTTP {status}: {text}")),
        }
    }
    Ok(new)
}

async fn connect_retrying(addr: SocketAddr) -> Result<TcpStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(format!("HTTP API at {addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One request, one response with a Content-Length body (all mod_http_api sends).
async fn http_roundtrip(
    s: &mut TcpStream,
    req: &str,
    buf: &mut Vec<u8>,
) -> Result<(u16, String), String> {
    let io = |e: std::io::Error| e.to_string();
    tokio::time::timeout(Duration::from_secs(30), async {
        s.write_all(req.as_bytes()).await.map_err(io)?;
        buf.clear();
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..h]).to_string();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(|| format!("bad HTTP response: {head}"))?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < h + 4 + len {
                    let n = s.read(&mut chunk).await.map_err(io)?;
                    if n == 0 {
                        return Err("HTTP connection closed".to_string());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let text = String::from_utf8_lossy(&buf[h + 4..h + 4 + len]).to_string();
                return Ok((status, text));
            }
            let n = s.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err("HTTP connection closed".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| "HTTP API timeout".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn parses_what_ejabberd_sends() {
        assert_eq!(
            parse(
                "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' id='1' version='1.0' xml:lang='en' from='localhost'/>"
            ),
            Element::Open
        );
        assert_eq!(
            parse(
                "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms></stream:features>"
            ),
            Element::Features
        );
        assert_eq!(
            parse("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"),
            Element::SaslSuccess
        );
        assert_eq!(
            parse(
                "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/><text xml:lang='en'>Invalid username or password</text></failure>"
            ),
            Element::SaslFailure("not-authorized".into())
        );
        assert_eq!(
            parse(
                "<iq xmlns='jabber:client' xml:lang='en' to='u@localhost/d0' type='result' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>u@localhost/d0</jid></bind></iq>"
            ),
            Element::Iq {
                ty: "result".into(),
                id: "b".into()
            }
        );
        assert_eq!(
            parse(
                "<message xml:lang='en' to='fu1@localhost' from='fs0@localhost/d0' type='chat' id='7' xmlns='jabber:client'><body>0:7:12&amp;3:x&gt;</body></message>"
            ),
            Element::Message {
                ty: "chat".into(),
                id: "7".into(),
                body: Some("0:7:12&3:x>".into()),
                error: None
            }
        );
        assert_eq!(
            parse("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"),
            Element::Closed("close".into())
        );
    }

    #[test]
    fn carbon_yields_the_forwarded_body() {
        let x = "<message from='u@localhost' to='u@localhost/d1' type='chat' xmlns='jabber:client'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message from='s@localhost/d0' to='u@localhost/d0' type='chat' id='9' xmlns='jabber:client'><body>1:9:5:xx</body></message></forwarded></received></message>";
        match parse(x) {
            Element::Message { body, .. } => assert_eq!(body.as_deref(), Some("1:9:5:xx")),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn error_message_names_its_condition() {
        let x = "<message type=\"error\" id=\"3\"><error type=\"cancel\"><text xmlns=\"urn:ietf:params:xml:ns:xmpp-stanzas\">gone</text><service-unavailable xmlns=\"urn:ietf:params:xml:ns:xmpp-stanzas\"/></error></message>";
        match parse(x) {
            Element::Message { error, id, .. } => {
                assert_eq!(error.as_deref(), Some("service-unavailable"));
                assert_eq!(id, "3");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn attributes_may_hold_gt_and_either_quote() {
        assert_eq!(
            parse("<iq id='a>b' type=\"result\"/>"),
            Element::Iq {
                ty: "result".into(),
                id: "a>b".into()
            }
        );
        assert_eq!(attr(" a='1' b = \"x&lt;y\"", "b").as_deref(), Some("x<y"));
        assert_eq!(attr(" a='1'", "b"), None);
    }

    #[test]
    fn escape_round_trips() {
        let s = "a<b>&\"c'&#x41;";
        assert_eq!(unescape(&escape(s)), s);
        assert_eq!(unescape("&#65;&#x42;&bogus;"), "AB&bogus;");
    }
}
