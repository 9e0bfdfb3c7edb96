//! A small typed client of the brand HTTP API, used by the CLI, the tests
//! and the load tester.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use herald_server::api::{ChannelStatsView, ChannelView, CreatedKey, History, KeyView, Published};
use herald_server::tenancy::{Brand, Grant};

/// Calls the HTTP API with one key.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// An API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{status}: {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

/// `127.0.0.1:8080` or `http://127.0.0.1:8080/` → `http://127.0.0.1:8080`.
pub fn base_url(api: &str) -> String {
    let api = api.trim().trim_end_matches('/');
    if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl ApiClient {
    /// `base` like `http://127.0.0.1:8080`, or an address like
    /// `127.0.0.1:8080` (then `http://` is assumed).
    pub fn new(base: &str, key: String) -> ApiClient {
        ApiClient {
            http: reqwest::Client::new(),
            base: base_url(base),
            key,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ApiCallError> {
        let resp = req.bearer_auth(&self.key).send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => ("unknown".to_string(), text),
        };
        Err(ApiCallError::Api {
            status: status.as_u16(),
            code,
            message,
        })
    }

    pub async fn create_channel(&self, id: &str, title: &str) -> Result<ChannelView, ApiCallError> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            title: &'a str,
        }
        self.send(
            self.http
                .post(format!("{}/v1/channels", self.base))
                .json(&Body { id, title }),
        )
        .await
    }

    pub async fn channel(&self, id: &str) -> Result<ChannelView, ApiCallError> {
        self.send(self.http.get(format!("{}/v1/channels/{id}", self.base)))
            .await
    }

    pub async fn publish(&self, channel: &str, text: &str) -> Result<Published, ApiCallError> {
        self.send(
            self.http
                .post(format!("{}/v1/channels/{channel}/posts", self.base))
                .json(&serde_json::json!({ "text": text })),
        )
        .await
    }

    /// Publishes with an `Idempotency-Key`: a retry with the same key answers
    /// the first post.
    pub async fn publish_idempotent(
        &self,
        channel: &str,
        text: &str,
        idempotency_key: &str,
    ) -> Result<Published, ApiCallError> {
        self.send(
            self.http
                .post(format!("{}/v1/channels/{channel}/posts", self.base))
                .header(herald_server::api::IDEMPOTENCY_KEY, idempotency_key)
                .json(&serde_json::json!({ "text": text })),
        )
        .await
    }

    /// Creates a brand (admin key).
    pub async fn create_brand(&self, id: &str, name: &str) -> Result<Brand, ApiCallError> {
        self.send(
            self.http
                .post(format!("{}/v1/brands", self.base))
                .json(&serde_json::json!({ "id": id, "name": name })),
        )
        .await
    }

    /// Creates a channel owned by `brand`.
    pub async fn create_brand_channel(
        &self,
        id: &str,
        title: &str,
        brand: &str,
    ) -> Result<ChannelView, ApiCallError> {
        self.send(
            self.http
                .post(format!("{}/v1/channels", self.base))
                .json(&serde_json::json!({ "id": id, "title": title, "brand": brand })),
        )
        .await
    }

    /// Creates an API key of `brand`; the answer holds the key, shown once.
    pub async fn create_key(
        &self,
        brand: &str,
        label: &str,
        grants: &[Grant],
    ) -> Result<CreatedKey, ApiCallError> {
        self.send(
            self.http
                .post(format!("{}/v1/brands/{brand}/keys", self.base))
                .json(&serde_json::json!({ "label": label, "grants": grants })),
        )
        .await
    }

    /// Revokes a key of `brand`.
    pub async fn revoke_key(&self, brand: &str, key_id: &str) -> Result<KeyView, ApiCallError> {
        self.send(
            self.http
                .delete(format!("{}/v1/brands/{brand}/keys/{key_id}", self.base)),
        )
        .await
    }

    /// A channel's stats.
    pub async fn stats(&self, channel: &str) -> Result<ChannelStatsView, ApiCallError> {
        self.send(
            self.http
                .get(format!("{}/v1/channels/{channel}/stats", self.base)),
        )
        .await
    }

    pub async fn history(
        &self,
        channel: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<History, ApiCallError> {
        self.send(self.http.get(format!(
            "{}/v1/channels/{channel}/posts?after_seq={after_seq}&limit={limit}",
            self.base
        )))
        .await
    }
}
