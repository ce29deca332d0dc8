//! `amqps://` connections: the TCP stream and its TLS made here, so that the trust
//! store is exactly what the settings say. With `AMQP_CA_FILE` its certificates are
//! the only trusted roots (lapin's own connector adds them to the system's); without
//! it, the system's trust store, and none at all is an error that says so rather than
//! a panic. A client certificate is presented when one is configured. The server's
//! name is always checked against its certificate.

use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::{HandshakeResult, RustlsConnector, TcpStream};
use lapin::uri::{AMQPScheme, AMQPUri};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS side of every `amqps://` connection of a config.
#[derive(Clone)]
pub(crate) struct Tls {
    connector: Arc<RustlsConnector>,
}

/// Why TLS could not be set up: the text names what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TlsSetupError(String);

impl Tls {
    /// Trust `ca_pem` only when given (else the system's roots), and present
    /// `client` (PEM certificate chain, PEM private key) when given.
    pub(crate) fn new(
        ca_pem: Option<&str>,
        client: Option<(&str, &str)>,
    ) -> Result<Self, TlsSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                let certs = certificates(pem)
                    .map_err(|why| TlsSetupError(format!("AMQP_CA_FILE: {why}")))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(TlsSetupError(
                        "AMQP_CA_FILE: none of its certificates can be a trust root".into(),
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    let why = found
                        .errors
                        .first()
                        .map_or_else(|| "it is empty".to_owned(), ToString::to_string);
                    return Err(TlsSetupError(format!(
                        "no trusted certificate authority for amqps://: the system's trust \
                         store cannot be read ({why}); set AMQP_CA_FILE to the CA's PEM file"
                    )));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError(format!("TLS versions: {e}")))?
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let chain = certificates(cert)
                    .map_err(|why| TlsSetupError(format!("AMQP_CLIENT_CERT_FILE: {why}")))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| {
                    TlsSetupError(format!(
                        "AMQP_CLIENT_KEY_FILE: expected a PEM private key ({e})"
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    TlsSetupError(format!(
                        "AMQP_CLIENT_CERT_FILE and AMQP_CLIENT_KEY_FILE do not make a client \
                         certificate: {e}"
                    ))
                })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            connector: Arc::new(RustlsConnector::from(config)),
        })
    }

    /// Connect to `uri`: plain TCP for `amqp://`, TLS for `amqps://`. Blocking; lapin
    /// runs it on a blocking thread.
    // The result type is the one lapin's connector takes.
    #[allow(clippy::result_large_err)]
    pub(crate) fn connect(&self, uri: &AMQPUri) -> HandshakeResult {
        let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
        let stream = match uri.query.connection_timeout {
            Some(ms) => TcpStream::connect_timeout(addr, Duration::from_millis(ms)),
            None => TcpStream::connect(addr),
        }?;
        let stream = match uri.scheme {
            AMQPScheme::AMQP => stream,
            AMQPScheme::AMQPS => stream.into_rustls(&self.connector, &uri.authority.host)?,
        };
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}

/// The certificates of a PEM text; an error when it holds none or one does not parse.
pub(crate) fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}
