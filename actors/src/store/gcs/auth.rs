//! Google credentials: Application Default Credentials through `gcp_auth`, looked for on
//! first use, and a bearer token on every request that goes to Google.

use std::sync::Arc;
use std::time::Duration;

use reqwest::RequestBuilder;
use tokio::sync::OnceCell;

use super::endpoint::Endpoint;
use super::error::{chain, GcsError};

/// The OAuth scope for reading and writing objects.
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// Tokens for requests, found on first use (finding them can mean asking a metadata server).
pub(super) enum Auth {
    /// Emulators and plain HTTP.
    None,
    /// Application Default Credentials, found on first use: `Ok(None)` when there are none
    /// (anonymous), `Err` when `GOOGLE_APPLICATION_CREDENTIALS` names a file that does not work.
    Adc(OnceCell<Result<Option<Arc<dyn gcp_auth::TokenProvider>>, String>>),
}

impl Auth {
    /// What requests to `endpoint` carry: credentials only where the endpoint takes them.
    pub(super) fn for_endpoint(endpoint: &Endpoint) -> Auth {
        if endpoint.authenticated {
            Auth::Adc(OnceCell::new())
        } else {
            Auth::None
        }
    }

    /// True once the search for credentials found none, so requests went out anonymous;
    /// a 403 then means "no credentials" rather than "not enough permission".
    pub(super) fn is_anonymous(&self) -> bool {
        match self {
            Auth::Adc(cell) => matches!(cell.get(), Some(Ok(None))),
            Auth::None => false,
        }
    }

    /// Adds a token to a request for `bucket` (named in the log when going anonymous).
    pub(super) async fn authorize(
        &self,
        rb: RequestBuilder,
        bucket: &str,
    ) -> Result<RequestBuilder, GcsError> {
        let Auth::Adc(cell) = self else {
            return Ok(rb);
        };
        let provider = cell
            .get_or_init(|| async {
                let explicit = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS");
                match tokio::time::timeout(Duration::from_secs(30), gcp_auth::provider()).await {
                    Ok(Ok(p)) => Ok(Some(p)),
                    // A key file the user pointed at must work: quietly going anonymous
                    // would turn a typo into "access denied" much later.
                    Ok(Err(e)) if explicit.is_some() => Err(format!(
                        "GOOGLE_APPLICATION_CREDENTIALS={}: {}",
                        explicit.unwrap_or_default().to_string_lossy(),
                        chain(&e)
                    )),
                    Ok(Err(e)) => {
                        tracing::info!(
                            "no Google credentials found ({}); using anonymous access to gs://{}, which works only for public buckets",
                            chain(&e),
                            bucket
                        );
                        Ok(None)
                    }
                    Err(_) => {
                        tracing::info!(
                            "looking for Google credentials timed out; using anonymous access to gs://{}, which works only for public buckets",
                            bucket
                        );
                        Ok(None)
                    }
                }
            })
            .await;
        match provider {
            Err(msg) => Err(GcsError::Credentials(msg.clone())),
            Ok(None) => Ok(rb),
            Ok(Some(p)) => {
                let token = p.token(&[SCOPE]).await.map_err(GcsError::Token)?;
                Ok(rb.bearer_auth(token.as_str()))
            }
        }
    }
}
