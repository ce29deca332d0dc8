//! Credentials from a mounted file (`REDIS_URL_FILE`): every connect and reconnect
//! reads the file again and authenticates with the user and password it holds now,
//! and a live connection re-authenticates when the file changes, so a rotated
//! Secret is picked up without a restart. The file's host and database are read at
//! start only.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use redis::{BasicAuth, ErrorKind, IntoConnectionInfo, RedisResult, StreamingCredentialsProvider};
use worker_core::SecretSource;

/// How often a live connection looks at the file for a new password.
const LOOK_EVERY: Duration = Duration::from_secs(10);

/// The user and password of the URL in a file.
#[derive(Clone)]
pub(crate) struct UrlFile {
    source: SecretSource,
    every: Duration,
}

impl UrlFile {
    pub(crate) fn new(source: SecretSource) -> Self {
        Self {
            source,
            every: LOOK_EVERY,
        }
    }

    /// The URL the file holds now.
    pub(crate) fn url(&self) -> RedisResult<String> {
        self.source.read().map_err(|e| {
            redis::RedisError::from((
                ErrorKind::AuthenticationFailed,
                "cannot read the Redis URL file",
                e.to_string(),
            ))
        })
    }

    fn credentials(&self) -> RedisResult<BasicAuth> {
        let info = self.url()?.as_str().into_connection_info()?;
        let settings = info.redis_settings();
        Ok(BasicAuth::new(
            settings.username().unwrap_or("default").to_owned(),
            settings.password().unwrap_or_default().to_owned(),
        ))
    }
}

impl StreamingCredentialsProvider for UrlFile {
    fn subscribe(&self) -> Pin<Box<dyn Stream<Item = RedisResult<BasicAuth>> + Send + 'static>> {
        let me = self.clone();
        // The credentials now, then each time they change.
        Box::pin(futures::stream::unfold(
            (me, None::<(String, String)>, false),
            |(me, mut last, mut started)| async move {
                loop {
                    if started {
                        tokio::time::sleep(me.every).await;
                    }
                    started = true;
                    match me.credentials() {
                        Ok(auth) => {
                            let now = (auth.username().to_owned(), auth.password().to_owned());
                            if last.as_ref() != Some(&now) {
                                last = Some(now);
                                return Some((Ok(auth), (me, last, started)));
                            }
                        }
                        Err(e) if last.is_none() => return Some((Err(e), (me, last, started))),
                        Err(e) => {
                            tracing::warn!(error = %e, "redis: cannot read the URL file again; keeping the credentials read before");
                        }
                    }
                }
            },
        ))
    }
}
