//! A small typed client of the brand HTTP API, used by the CLI, the tests
//! and the load tester.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::{ChannelView, History, Published};

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
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: &str, key: String) -> ApiClient {
        ApiClient {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
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
