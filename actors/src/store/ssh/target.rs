//! Where an `ssh://` store lives: the URL a user writes, and the `ssh` command lines that reach
//! it.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::formats::StoreDir;
use crate::store::StoreError;

/// The remote program Nix runs on the other side when none is configured.
const DEFAULT_REMOTE_PROGRAM: &str = "nix-store";

/// A parsed `ssh://[user@]host[:port][/storedir][?param=value&…]` URL.
///
/// Parameters follow Nix's own `ssh://` store: `ssh-key`, `remote-store`, `remote-program`,
/// `compress`; plus the store settings `priority` and `want-mass-query` for `nix-cache-info`.
/// `max-connections` is accepted and ignored (this store uses one connection for metadata and
/// one per NAR being streamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The login user; `None` lets ssh decide (its config, or the local user name).
    pub user: Option<String>,
    /// The host name or address (IPv6 without brackets).
    pub host: String,
    /// The port, passed to ssh with `-p`.
    pub port: Option<u16>,
    /// The store directory of the remote store, as it appears in store paths.
    pub store_dir: StoreDir,
    /// A private key, passed to ssh with `-i` (`?ssh-key=`).
    pub ssh_key: Option<PathBuf>,
    /// The store the remote `nix-store` opens (`?remote-store=`, passed as `--store`).
    pub remote_store: Option<String>,
    /// The `nix-store` executable on the remote host (`?remote-program=`).
    pub remote_program: String,
    /// Ask ssh to compress the connection (`?compress=true`, ssh `-C`).
    pub compress: bool,
    /// `Priority:` advertised in `nix-cache-info` (`?priority=`).
    pub priority: Option<u32>,
    /// `WantMassQuery:` advertised in `nix-cache-info` (`?want-mass-query=`, default true).
    pub want_mass_query: bool,
}

fn invalid(url: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("ssh store URL {url:?}: {why}"))
}

/// Decodes `%XX` escapes; the `url` crate leaves user names and paths escaped.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn flag(url: &str, key: &str, value: &str) -> Result<bool, StoreError> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(invalid(
            url,
            format!("{key}={value:?} is not true or false"),
        )),
    }
}

impl SshTarget {
    /// Parses what a user typed.
    pub fn parse(s: &str) -> Result<SshTarget, StoreError> {
        let url = url::Url::parse(s).map_err(|e| invalid(s, e))?;
        if url.scheme() != "ssh" {
            return Err(invalid(s, "the scheme must be ssh://"));
        }
        if url.password().is_some() {
            return Err(invalid(
                s,
                "passwords cannot be given in the URL; use a key (?ssh-key=) or ssh-agent",
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid(s, "no host; write ssh://[user@]host[:port]"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let host = percent_decode(host).ok_or_else(|| invalid(s, "bad %-escape in the host"))?;
        let user = match url.username() {
            "" => None,
            u => Some(percent_decode(u).ok_or_else(|| invalid(s, "bad %-escape in the user"))?),
        };
        // ssh would read a leading '-' as an option; nothing legitimate starts that way.
        if host.starts_with('-') || user.as_deref().is_some_and(|u| u.starts_with('-')) {
            return Err(invalid(s, "user and host must not start with '-'"));
        }
        let path =
            percent_decode(url.path()).ok_or_else(|| invalid(s, "bad %-escape in the path"))?;
        let store_dir = if path.is_empty() || path == "/" {
            StoreDir::default()
        } else {
            StoreDir::new(&path).map_err(|e| invalid(s, e))?
        };
        let mut target = SshTarget {
            user,
            host,
            port: url.port(),
            store_dir,
            ssh_key: None,
            remote_store: None,
            remote_program: DEFAULT_REMOTE_PROGRAM.into(),
            compress: false,
            priority: None,
            want_mass_query: true,
        };
        for (k, v) in url.query_pairs() {
            match &*k {
                "ssh-key" if !v.is_empty() => target.ssh_key = Some(PathBuf::from(&*v)),
                "remote-store" if !v.is_empty() => target.remote_store = Some(v.into_owned()),
                "remote-program" if !v.is_empty() => target.remote_program = v.into_owned(),
                "compress" => target.compress = flag(s, &k, &v)?,
                "want-mass-query" => target.want_mass_query = flag(s, &k, &v)?,
                "priority" => {
                    target.priority = Some(
                        v.parse()
                            .map_err(|_| invalid(s, format!("priority={v:?} is not a number")))?,
                    )
                }
                "max-connections" => {}
                "base64-ssh-public-host-key" => {
                    return Err(invalid(
                        s,
                        "base64-ssh-public-host-key is not supported; put the host key in ~/.ssh/known_hosts",
                    ))
                }
                other => {
                    return Err(invalid(
                        s,
                        format!(
                            "unknown parameter {other:?}; ssh stores take ssh-key, remote-store, remote-program, compress, priority, want-mass-query"
                        ),
                    ))
                }
            }
        }
        Ok(target)
    }

    /// `[user@]host`, the destination argument of ssh.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// The URL again, normalised, for logs and error messages.
    pub fn describe(&self) -> String {
        let mut s = String::from("ssh://");
        if let Some(u) = &self.user {
            let _ = write!(s, "{u}@");
        }
        if self.host.contains(':') {
            let _ = write!(s, "[{}]", self.host);
        } else {
            s.push_str(&self.host);
        }
        if let Some(p) = self.port {
            let _ = write!(s, ":{p}");
        }
        if self.store_dir != StoreDir::default() {
            s.push_str(self.store_dir.as_str());
        }
        if let Some(r) = &self.remote_store {
            let _ = write!(s, "?remote-store={r}");
        }
        s
    }

    /// The arguments of `ssh` (without the program name) that run `remote_command` there.
    ///
    /// The URL's port and key come first because ssh keeps the first value it is given for an
    /// option: an explicit `ssh://host:port` beats a `-p` in `NIX_SSHOPTS`. Our own defaults
    /// come after `NIX_SSHOPTS` for the same reason, so users can override them there (for
    /// example `-o BatchMode=no` to allow a passphrase prompt).
    pub fn ssh_args(&self, nix_sshopts: &str, remote_command: &str) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(p) = self.port {
            args.extend(["-p".to_owned(), p.to_string()]);
        }
        if let Some(k) = &self.ssh_key {
            args.extend(["-i".to_owned(), k.display().to_string()]);
        }
        // Nix splits NIX_SSHOPTS on whitespace, without shell quoting; do the same.
        args.extend(nix_sshopts.split_whitespace().map(str::to_owned));
        if self.compress {
            args.push("-C".into());
        }
        // A daemon has no one to type a password: fail instead of prompting. No X11 or agent
        // forwarding and no terminal: the channel carries a binary protocol.
        args.extend(
            ["-o", "BatchMode=yes", "-x", "-a", "-T", "--"]
                .iter()
                .map(|s| s.to_string()),
        );
        args.push(self.destination());
        args.push(remote_command.to_owned());
        args
    }

    /// `env NIX_STORE_DIR=…` before a remote command when the store directory is not the
    /// default; `env` keeps it working whatever the remote login shell is.
    fn env_prefix(&self) -> String {
        if self.store_dir == StoreDir::default() {
            String::new()
        } else {
            format!(
                "env NIX_STORE_DIR={} ",
                shell_quote(self.store_dir.as_str())
            )
        }
    }

    fn store_option(&self) -> String {
        match &self.remote_store {
            Some(r) => format!(" --store {}", shell_quote(r)),
            None => String::new(),
        }
    }

    /// The remote command speaking the serve protocol; `write` allows imports.
    pub fn serve_command(&self, write: bool) -> String {
        format!(
            "{}{} --serve{}{}",
            self.env_prefix(),
            shell_quote(&self.remote_program),
            if write { " --write" } else { "" },
            self.store_option()
        )
    }

    /// The remote command printing a derivation's build log.
    pub fn read_log_command(&self, drv_path: &str) -> String {
        format!(
            "{}{}{} --read-log {}",
            self.env_prefix(),
            shell_quote(&self.remote_program),
            self.store_option(),
            shell_quote(drv_path)
        )
    }

    /// The remote command listing the names in the store directory.
    pub fn list_command(&self) -> String {
        format!("ls -f -- {}", shell_quote(&self.real_store_dir()))
    }

    /// Where the remote store keeps its objects on the remote file system: the store
    /// directory itself, or below the root of a chroot store (`remote-store=/dir` or
    /// `local?root=/dir`), or what `real=` says.
    pub fn real_store_dir(&self) -> String {
        let dir = self.store_dir.as_str();
        let Some(remote) = &self.remote_store else {
            return dir.to_owned();
        };
        let (base, query) = remote.split_once('?').unwrap_or((remote, ""));
        let mut root = base.starts_with('/').then(|| base.to_owned());
        let mut real = None;
        let mut store = dir.to_owned();
        if base.starts_with('/') || base == "local" || base == "auto" || base.is_empty() {
            for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
                match &*k {
                    "root" => root = Some(v.into_owned()),
                    "real" => real = Some(v.into_owned()),
                    "store" => store = v.into_owned(),
                    _ => {}
                }
            }
        }
        match (real, root) {
            (Some(real), _) => real,
            (None, Some(root)) => format!("{}{}", root.trim_end_matches('/'), store),
            (None, None) => store,
        }
    }
}

/// Quotes a word for a POSIX shell (the remote login shell reads the command ssh sends):
/// words of safe characters stay as they are, anything else goes in single quotes.
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_host_port_dir_and_params() {
        let t = SshTarget::parse(
            "ssh://builder@cache.example:2222/custom/store?ssh-key=/k/id&remote-store=/tmp/r&compress=true&priority=30",
        )
        .unwrap();
        assert_eq!(t.user.as_deref(), Some("builder"));
        assert_eq!(t.host, "cache.example");
        assert_eq!(t.port, Some(2222));
        assert_eq!(t.store_dir.as_str(), "/custom/store");
        assert_eq!(t.ssh_key, Some(PathBuf::from("/k/id")));
        assert_eq!(t.remote_store.as_deref(), Some("/tmp/r"));
        assert!(t.compress);
        assert_eq!(t.priority, Some(30));
        assert_eq!(t.destination(), "builder@cache.example");

        let t = SshTarget::parse("ssh://host").unwrap();
        assert_eq!((t.user.as_deref(), t.port), (None, None));
        assert_eq!(t.store_dir, StoreDir::default());
        assert_eq!(t.remote_program, "nix-store");
        assert_eq!(t.destination(), "host");

        let t = SshTarget::parse("ssh://root@[::1]:22/").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.destination(), "root@::1");
        assert_eq!(t.describe(), "ssh://root@[::1]:22");

        let t =
            SshTarget::parse("ssh://a%40b@h/nix/store?remote-store=local%3Froot%3D%2Fx").unwrap();
        assert_eq!(t.user.as_deref(), Some("a@b"));
        assert_eq!(t.remote_store.as_deref(), Some("local?root=/x"));
    }

    #[test]
    fn refuses_what_cannot_work() {
        for bad in [
            "ssh://",
            "ssh:///nix/store",
            "ssh://u:pw@h",
            "ssh://h//x",
            "ssh://h?bogus=1",
            "ssh://h?compress=maybe",
            "ssh://h?priority=high",
            "ssh://-oProxyCommand=x",
            "ssh://h:99999",
            "ssh://h?base64-ssh-public-host-key=AAAA",
        ] {
            assert!(
                matches!(SshTarget::parse(bad), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn command_line_passes_port_with_p_and_options_in_order() {
        let t = SshTarget::parse("ssh://root@127.0.0.1:2200?ssh-key=/k&compress=1").unwrap();
        let args = t.ssh_args(" -p 22  -o LogLevel=ERROR\t", "nix-store --serve --write");
        assert_eq!(
            args,
            [
                "-p",
                "2200",
                "-i",
                "/k",
                "-p",
                "22",
                "-o",
                "LogLevel=ERROR",
                "-C",
                "-o",
                "BatchMode=yes",
                "-x",
                "-a",
                "-T",
                "--",
                "root@127.0.0.1",
                "nix-store --serve --write",
            ]
        );
        let plain = SshTarget::parse("ssh://h").unwrap();
        assert_eq!(
            plain.ssh_args("", "x"),
            ["-o", "BatchMode=yes", "-x", "-a", "-T", "--", "h", "x"]
        );
    }

    #[test]
    fn remote_commands_are_quoted() {
        let t = SshTarget::parse("ssh://h?remote-store=/tmp/my store").unwrap();
        assert_eq!(
            t.serve_command(true),
            "nix-store --serve --write --store '/tmp/my store'"
        );
        assert_eq!(
            t.serve_command(false),
            "nix-store --serve --store '/tmp/my store'"
        );
        assert_eq!(t.list_command(), "ls -f -- '/tmp/my store/nix/store'");
        let t = SshTarget::parse("ssh://h/opt/store?remote-program=/opt/bin/nix-store").unwrap();
        assert_eq!(
            t.serve_command(false),
            "env NIX_STORE_DIR=/opt/store /opt/bin/nix-store --serve"
        );
        assert_eq!(
            t.read_log_command("/opt/store/x.drv"),
            "env NIX_STORE_DIR=/opt/store /opt/bin/nix-store --read-log /opt/store/x.drv"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("a;rm -rf /"), "'a;rm -rf /'");
        assert_eq!(shell_quote("$(x)"), "'$(x)'");
    }

    #[test]
    fn real_store_dir_follows_the_remote_store() {
        let real = |u: &str| SshTarget::parse(u).unwrap().real_store_dir();
        assert_eq!(real("ssh://h"), "/nix/store");
        assert_eq!(
            real("ssh://h?remote-store=/srv/root/"),
            "/srv/root/nix/store"
        );
        assert_eq!(
            real("ssh://h?remote-store=local%3Froot%3D%2Fsrv"),
            "/srv/nix/store"
        );
        assert_eq!(
            real("ssh://h?remote-store=local%3Freal%3D%2Fdata%2Fstore"),
            "/data/store"
        );
        assert_eq!(real("ssh://h?remote-store=daemon"), "/nix/store");
        assert_eq!(real("ssh://h/other/store"), "/other/store");
    }
}
