//! Pub/Sub's checks on a call, in its order: credentials, then the resource.

use super::wire::{grpc_message, percent_decode, resource, routing};
use super::*;

/// A gRPC call: credentials, then `x-goog-request-params` naming the
/// resource its body is about.
pub(super) fn check_grpc(
    state: &State,
    call: &mut Call,
    path: &str,
    body: &[u8],
) -> Result<(), (u16, String)> {
    call.method = path.trim_start_matches("/google.pubsub.v1.").to_string();
    let Some((key, field)) = routing(&call.method) else {
        return Err((
            UNIMPLEMENTED,
            format!("the test front does not know {}", call.method),
        ));
    };
    call.resource = grpc_message(body).and_then(|m| resource(m, field));
    check_credentials(state, call)?;
    let Some(resource) = &call.resource else {
        return Err((PERMISSION_DENIED, "the request names no resource".into()));
    };
    let named = call.request_params.as_deref().is_some_and(|params| {
        params
            .split('&')
            .filter_map(|p| p.split_once('='))
            .any(|(k, v)| k == key && percent_decode(v) == *resource)
    });
    if !named {
        return Err((
            PERMISSION_DENIED,
            format!(
                "x-goog-request-params {:?} does not name {key}={resource}",
                call.request_params
            ),
        ));
    }
    Ok(())
}

/// A REST call (the official admin clients speak HTTP/JSON): credentials;
/// the URL names the resource, so there is no routing header to check.
pub(super) fn check_rest(
    state: &State,
    call: &mut Call,
    parts: &http::request::Parts,
) -> Result<(), (u16, String)> {
    let path = parts.uri.path().trim_start_matches("/v1/");
    let (resource, verb) = path.split_once(':').unwrap_or((path, ""));
    let kind = resource.split('/').nth(2).unwrap_or("");
    call.method = match (kind, parts.method.as_str(), verb) {
        ("topics", "PUT", "") => "Publisher/CreateTopic",
        ("topics", "PATCH", "") => "Publisher/UpdateTopic",
        ("topics", "GET", "") => "Publisher/GetTopic",
        ("topics", "DELETE", "") => "Publisher/DeleteTopic",
        ("topics", "POST", "publish") => "Publisher/Publish",
        ("subscriptions", "PUT", "") => "Subscriber/CreateSubscription",
        ("subscriptions", "PATCH", "") => "Subscriber/UpdateSubscription",
        ("subscriptions", "GET", "") => "Subscriber/GetSubscription",
        ("subscriptions", "DELETE", "") => "Subscriber/DeleteSubscription",
        ("subscriptions", "POST", "pull") => "Subscriber/Pull",
        ("subscriptions", "POST", "acknowledge") => "Subscriber/Acknowledge",
        ("subscriptions", "POST", "modifyAckDeadline") => "Subscriber/ModifyAckDeadline",
        _ => {
            call.method = format!("{} {}", parts.method, parts.uri.path());
            return Err((
                UNIMPLEMENTED,
                format!("the test front does not know {}", call.method),
            ));
        }
    }
    .to_string();
    call.resource = Some(resource.to_string());
    check_credentials(state, call)
}

/// The bearer token must be one the token endpoint issued, not expired,
/// and not revoked by the test.
pub(super) fn check_credentials(state: &State, call: &Call) -> Result<(), (u16, String)> {
    let Some(token) = &call.token else {
        return Err((
            UNAUTHENTICATED,
            "Request is missing required authentication credential".into(),
        ));
    };
    match state.tokens.lock().unwrap().get(token) {
        None => return Err((UNAUTHENTICATED, "unknown access token".into())),
        // A second of grace for a token sent just before it expired.
        Some(expiry) if *expiry + Duration::from_secs(1) < Instant::now() => {
            return Err((UNAUTHENTICATED, "the access token expired".into()));
        }
        Some(_) => {}
    }
    match &*state.policy.lock().unwrap() {
        Policy::Refuse(code) => Err((*code, "refused by the test (credentials revoked)".into())),
        Policy::RefuseMethod(method, code) if *method == call.method => Err((
            *code,
            format!("refused by the test (no permission for {method})"),
        )),
        _ => Ok(()),
    }
}
