//! The OAuth token endpoint.

use super::*;

/// The OAuth refresh-token grant, as google-cloud-auth sends it (JSON).
pub(super) async fn token(state: &State, req: Request<Incoming>) -> Response<Body> {
    if !state.token_endpoint_up.load(Ordering::Relaxed) {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "temporarily_unavailable"}),
        );
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let grant: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if grant["grant_type"] != "refresh_token"
        || grant["refresh_token"] != REFRESH_TOKEN
        || grant["client_id"] != CLIENT_ID
    {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "invalid_grant"}),
        );
    }
    let token = issue(state);
    state.token_requests.fetch_add(1, Ordering::Relaxed);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": state.token_lifetime.as_secs(),
        }),
    )
}

/// A fresh token, valid for the front's token lifetime.
pub(super) fn issue(state: &State) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let token = format!(
        "ya29.test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    state
        .tokens
        .lock()
        .unwrap()
        .insert(token.clone(), Instant::now() + state.token_lifetime);
    token
}
