//! `nixcached credential new`: a fresh random token and the hashed entry for the config, so
//! nobody hashes secrets by hand (and no plain secret needs to be in a config file).

use anyhow::bail;
use nixcached_actors::http::auth::{hash_secret, Credential, CredentialSpec};

use crate::cli::CredentialCommand;

/// 32 random bytes in hex: 256 bits, so a fast hash of it is as good as a slow one.
fn fresh_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| anyhow::anyhow!("reading the system random source: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What `credential new` prints for `token` (split out so tests can check it).
pub fn entry_text(token: &str, rights: &[String], user: Option<&str>) -> anyhow::Result<String> {
    let spec = CredentialSpec {
        token_hash: user.is_none().then(|| hash_secret(token)),
        user: user.map(str::to_owned),
        password_hash: user.is_some().then(|| hash_secret(token)),
        rights: rights.to_vec(),
    };
    // The entry printed must be one `serve` accepts.
    Credential::from_spec(&spec)?;
    let rights_list = rights
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let secret_line = match user {
        None => format!("token-hash = \"{}\"", hash_secret(token)),
        Some(u) => format!("user = {u:?}\npassword-hash = \"{}\"", hash_secret(token)),
    };
    let login = user.unwrap_or("nixcached");
    Ok(format!(
        "# Give this secret to the client; it is shown only now and stored nowhere:\n\
         # {token}\n\
         # clients: `Authorization: Bearer {token}`, or a netrc-file line for Nix:\n\
         #   machine CACHE-HOST login {login} password {token}\n\
         # Paste into the [[cache]] of the config file (in a --credentials file, write [[credential]]):\n\
         [[cache.credential]]\n\
         {secret_line}\n\
         rights = [{rights_list}]\n"
    ))
}

/// Runs `nixcached credential`.
pub fn run(cmd: CredentialCommand) -> anyhow::Result<()> {
    match cmd {
        CredentialCommand::New { rights, user } => {
            if user
                .as_deref()
                .is_some_and(|u| u.is_empty() || u.contains(':'))
            {
                bail!("--user: give a non-empty name without ':' (Basic authentication splits at the first ':')");
            }
            let token = fresh_token()?;
            print!("{}", entry_text(&token, &rights, user.as_deref())?);
            Ok(())
        }
    }
}
