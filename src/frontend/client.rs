//! What the API's own clients (the CLI's `status`/`query`/`sql`, `produce`)
//! share: the access token and the certificate authority to trust.
//!
//! `LAMBDAFLOW_TOKEN` is sent as `Authorization: Bearer …` (marked sensitive,
//! so it never appears in debug output); `LAMBDAFLOW_CA_CERT` names a PEM file
//! of an extra root certificate, for a server with a self-signed certificate.

/// A client builder carrying the token and CA from the environment.
pub fn builder() -> Result<reqwest::ClientBuilder, String> {
    let mut b = reqwest::Client::builder();
    if let Ok(token) = std::env::var("LAMBDAFLOW_TOKEN") {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| "LAMBDAFLOW_TOKEN holds characters a header cannot carry".to_string())?;
        v.set_sensitive(true);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, v);
        b = b.default_headers(headers);
    }
    if let Ok(path) = std::env::var("LAMBDAFLOW_CA_CERT") {
        let pem = std::fs::read(&path)
            .map_err(|e| format!("could not read LAMBDAFLOW_CA_CERT {path}: {e}"))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| format!("LAMBDAFLOW_CA_CERT {path} is not a PEM certificate: {e}"))?;
        b = b.add_root_certificate(cert);
    }
    Ok(b)
}

/// A client for one-off requests.
pub fn client() -> Result<reqwest::Client, String> {
    builder()?.build().map_err(|e| e.to_string())
}
