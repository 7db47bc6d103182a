//! The production path, end to end: the real binary talks TLS to a stand-in
//! for Google ([`GoogleFront`], in front of the emulator) with Application
//! Default Credentials from a local token endpoint, and every RPC must carry
//! its bearer token and routing header. No `PUBSUB_EMULATOR_HOST` for the
//! binary: `pubsub.endpoint` names the front, as it would name Google.

// Wall-clock waits on real processes and on the front's clock.
#![allow(clippy::disallowed_types)]

#[path = "support/google_front.rs"]
mod google_front;
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use google_front::{Call, GoogleFront, PERMISSION_DENIED, Policy, UNAUTHENTICATED};
use support::*;

/// A world on the emulator, and the front the binary reaches it through.
struct Production {
    world: World,
    front: GoogleFront,
}

impl Production {
    /// Starts a front issuing `token_lifetime` tokens, and a world (no
    /// resources yet) whose config points `pubsub.endpoint` at the front.
    fn new(name: &str, extra: &str, token_lifetime: Duration) -> Production {
        let host = emulator_host();
        let mut world = World::without_setup(&host, name, extra);
        let front = GoogleFront::start(&host, world.dir.path(), token_lifetime);
        let layer = world.path("google.toml");
        std::fs::write(
            &layer,
            format!("[pubsub]\nendpoint = \"{}\"\n", front.endpoint()),
        )
        .unwrap();
        world.config_paths.push(layer);
        Production { world, front }
    }

    /// `leasehold ARGS --config ...` as a user on Google would run it: ADC
    /// from a file, the test CA trusted through `SSL_CERT_FILE`, no emulator.
    fn leasehold(&self, args: &[&str]) -> Command {
        self.leasehold_trusting(args, self.front.ca_file(), self.front.adc_file())
    }

    fn leasehold_trusting(&self, args: &[&str], ca: &Path, adc: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_leasehold"));
        command
            .args(args)
            .args(self.world.config_args())
            .env_remove("PUBSUB_EMULATOR_HOST")
            .env_remove("SSL_CERT_DIR")
            .env_remove("LEASEHOLD_LOG_FORMAT")
            .env("SSL_CERT_FILE", ca)
            .env("GOOGLE_APPLICATION_CREDENTIALS", adc)
            .env("RUST_LOG", "info");
        command
    }

    fn worker(&self, name: &str) -> WorkerProcess {
        let mut command = self.leasehold(&["run"]);
        command.env("WORKER_NAME", name);
        WorkerProcess::spawn(command, self.world.path(&format!("{name}.log")))
    }

    /// Runs `setup` through the front.
    fn setup(&self) {
        let out = self.leasehold(&["setup"]).output().unwrap();
        assert!(out.status.success(), "setup: {}", text(&out));
    }

    /// The calls the worker and the CLI made to one subscription or topic.
    fn calls_on(&self, method: &str, resource: &str) -> Vec<Call> {
        self.front
            .calls()
            .into_iter()
            .filter(|c| c.method == method && c.resource.as_deref() == Some(resource))
            .collect()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits for /readyz to answer `status`.
async fn readyz(addr: &str, status: u16, limit: Duration, worker: &WorkerProcess) {
    let start = Instant::now();
    loop {
        if http_get(addr, "/readyz").is_ok_and(|(s, _)| s == status) {
            return;
        }
        assert!(
            start.elapsed() <= limit,
            "/readyz did not answer {status} within {limit:?}\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The result events on the results subscription, as (task id, outcome).
async fn result_events(world: &World, wait: Duration) -> Vec<(String, String)> {
    let sub = world.subscription(&world.config.pubsub.results_topic);
    world
        .pull_for(&sub, wait)
        .await
        .iter()
        .filter_map(|m| m.message.as_ref())
        .map(|m| {
            (
                m.attributes["task_id"].clone(),
                m.attributes["outcome"].clone(),
            )
        })
        .collect()
}

/// The front checks what Pub/Sub checks: a call without credentials, with a
/// token it did not issue, or without a routing header naming its
/// subscription is refused; a complete one reaches the emulator.
#[tokio::test(flavor = "multi_thread")]
async fn the_front_refuses_calls_pubsub_would_refuse() {
    use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::PullRequest;
    use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::subscriber_client::SubscriberClient;

    let p = Production::new("front", "", Duration::from_secs(60));
    p.world.setup().await;
    let sub = p.world.cpu_subscription();
    let ca = std::fs::read_to_string(p.front.ca_file()).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    let channel = tonic::transport::Endpoint::from_shared(p.front.endpoint())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let pull = |token: Option<String>, params: Option<String>| {
        let mut client = SubscriberClient::new(channel.clone());
        #[allow(deprecated)]
        let mut request = tonic::Request::new(PullRequest {
            subscription: sub.clone(),
            return_immediately: true,
            max_messages: 1,
        });
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(p) = params {
            request
                .metadata_mut()
                .insert("x-goog-request-params", p.parse().unwrap());
        }
        async move { client.pull(request).await.map(|_| ()) }
    };
    let routed = Some(format!("subscription={sub}"));
    let valid = Some(p.front.issue_token());

    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(pull(None, routed.clone()).await),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(pull(Some("forged".into()), routed.clone()).await),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(pull(valid.clone(), None).await),
        Some(tonic::Code::PermissionDenied)
    );
    let other = format!("subscription={sub}-other");
    assert_eq!(
        code(pull(valid.clone(), Some(other)).await),
        Some(tonic::Code::PermissionDenied)
    );
    // Percent-encoded, as some clients send it, names the same resource.
    let encoded = format!("subscription={}", sub.replace('/', "%2F"));
    assert_eq!(code(pull(valid.clone(), Some(encoded)).await), None);
    assert_eq!(code(pull(valid.clone(), routed.clone()).await), None);

    p.front.set_policy(Policy::Refuse(PERMISSION_DENIED));
    assert_eq!(
        code(pull(valid.clone(), routed.clone()).await),
        Some(tonic::Code::PermissionDenied)
    );
    let refused: Vec<Option<u16>> = p.front.calls().iter().map(|c| c.refused).collect();
    assert_eq!(
        refused,
        [
            Some(UNAUTHENTICATED),
            Some(UNAUTHENTICATED),
            Some(PERMISSION_DENIED),
            Some(PERMISSION_DENIED),
            None,
            None,
            Some(PERMISSION_DENIED)
        ]
    );
}

/// `setup`, `publish` and `run` work through TLS with ADC: every RPC of the
/// admin clients, the publisher and our own data plane carries a token the
/// front issued and a routing header naming its resource.
#[tokio::test(flavor = "multi_thread")]
async fn setup_publish_and_run_cross_the_front() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        recording_handler("work", runs.path(), "cpu")
    );
    let p = Production::new("e2e", &extra, Duration::from_secs(60));
    p.setup();
    let out = p
        .leasehold(&[
            "publish",
            "--kind",
            "work",
            "--task-id",
            "e2e-1",
            "--data",
            r#"{"seconds": 8}"#,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "publish: {}", text(&out));

    let worker = p.worker("w1");
    let addr = worker.http_addr().await;
    readyz(&addr, 200, Duration::from_secs(20), &worker).await;
    wait_for_event(runs.path(), 30, "the task to end", |e| e.what == "end").await;
    let events = result_events(&p.world, Duration::from_secs(4)).await;
    assert!(
        events.contains(&("e2e-1".into(), "succeeded".into())),
        "{events:?}\n{}",
        worker.log()
    );

    let calls = p.front.calls();
    let refused: Vec<&Call> = calls.iter().filter(|c| c.refused.is_some()).collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    let sub = p.world.cpu_subscription();
    let topic = p
        .world
        .conn
        .topic_path(&p.world.config.executors["cpu"].topic);
    let results = p
        .world
        .conn
        .topic_path(&p.world.config.pubsub.results_topic);
    for (method, resource) in [
        ("Publisher/CreateTopic", &topic),
        ("Subscriber/CreateSubscription", &sub),
        ("Publisher/Publish", &topic),
        ("Subscriber/Pull", &sub),
        ("Subscriber/ModifyAckDeadline", &sub),
        ("Subscriber/Acknowledge", &sub),
        ("Publisher/Publish", &results),
    ] {
        assert!(
            !p.calls_on(method, resource).is_empty(),
            "no accepted {method} on {resource}: {calls:#?}"
        );
    }
}

/// A task 2.5 times as long as its ack deadline keeps its lease while the
/// tokens it is extended with expire and are replaced: every extension goes
/// out with a valid token before the deadline it extends.
///
/// Tokens live 15 s, not less: google-cloud-auth refreshes a token with
/// under 4 minutes left every 10 s, so a shorter lifetime leaves the worker
/// without a valid token for part of each 10 s and its calls wait (seen with
/// 5 s tokens: the first extension left 10.04 s after the Pull). Real tokens
/// live an hour and are refreshed 4 minutes ahead.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_lease_survives_token_refreshes() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        recording_handler("long", runs.path(), "cpu")
    );
    let p = Production::new("tokens", &extra, Duration::from_secs(15));
    p.world.setup().await;
    p.world
        .publish(&[task("long", "long-1", r#"{"seconds": 25}"#)])
        .await;
    let worker = p.worker("w1");
    let addr = worker.http_addr().await;
    wait_for_event(runs.path(), 50, "the 25 s task to end", |e| e.what == "end").await;
    // Past the ack deadline: a lapsed lease would have been redelivered by now.
    tokio::time::sleep(Duration::from_secs(11)).await;

    let ev = events(runs.path());
    let starts = ev.iter().filter(|e| e.what == "start").count();
    assert_eq!(starts, 1, "ran once: {ev:?}\n{}", worker.log());
    let calls = p.front.calls();
    let refused: Vec<&Call> = calls.iter().filter(|c| c.refused.is_some()).collect();
    assert!(
        refused.is_empty(),
        "refused: {refused:#?}\n{}",
        worker.log()
    );
    let sub = p.world.cpu_subscription();
    let pulled = p.calls_on("Subscriber/Pull", &sub)[0].at;
    let extended: Vec<&Call> = calls
        .iter()
        .filter(|c| c.method == "Subscriber/ModifyAckDeadline")
        .take_while(|c| c.at < pulled + Duration::from_secs(25))
        .collect();
    let mut sent = vec![pulled];
    sent.extend(extended.iter().map(|c| c.at));
    let gaps: Vec<Duration> = sent.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        extended.len() >= 3 && gaps.iter().all(|g| *g < Duration::from_secs(9)),
        "each extension before the 10 s deadline: gaps {gaps:?}"
    );
    let mut tokens: Vec<&str> = extended.iter().filter_map(|c| c.token.as_deref()).collect();
    tokens.dedup();
    assert!(tokens.len() >= 2, "extended with tokens {tokens:?}");
    assert!(
        p.front.tokens_issued() >= 4,
        "tokens issued: {}",
        p.front.tokens_issued()
    );
    assert!(!p.calls_on("Subscriber/Acknowledge", &sub).is_empty());
    let (_, metrics) = http_get(&addr, "/metrics").unwrap();
    let label = &p.world.config.executors["cpu"].subscription;
    let lost = format!("leasehold_leases_lost_total{{subscription=\"{label}\"}}");
    // The series appears at the first lost lease.
    assert!(sample(&metrics, &lost).unwrap_or(0.0) == 0.0, "{metrics}");
}

/// Credentials revoked while the worker runs: every call is refused,
/// readiness goes 503, the pulls back off; once accepted again the worker is
/// ready and runs every task, including those published meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn revoked_credentials_make_the_worker_unready_until_restored() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        recording_handler("work", runs.path(), "cpu")
    );
    let p = Production::new("revoked", &extra, Duration::from_secs(60));
    p.world.setup().await;
    let worker = p.worker("w1");
    let addr = worker.http_addr().await;
    readyz(&addr, 200, Duration::from_secs(20), &worker).await;

    // One task runs through the revocation: its ack is refused.
    p.world
        .publish(&[task("work", "during", r#"{"seconds": 3}"#)])
        .await;
    wait_for_event(runs.path(), 15, "the first task to start", |e| {
        e.what == "start"
    })
    .await;
    p.front.set_policy(Policy::Refuse(UNAUTHENTICATED));
    let revoked_at = Instant::now();
    p.world
        .publish(&[
            task("work", "meanwhile-1", r#"{"seconds": 0}"#),
            task("work", "meanwhile-2", r#"{"seconds": 0}"#),
        ])
        .await;
    readyz(&addr, 503, Duration::from_secs(15), &worker).await;
    tokio::time::sleep_until((revoked_at + Duration::from_secs(18)).into()).await;

    let sub = p.world.cpu_subscription();
    let pulls: Vec<Instant> = p
        .calls_on("Subscriber/Pull", &sub)
        .iter()
        .filter(|c| c.refused == Some(UNAUTHENTICATED))
        .map(|c| c.at)
        .collect();
    let gaps: Vec<Duration> = pulls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        (3..=12).contains(&pulls.len()),
        "refused pulls in 18 s: {} (gaps {gaps:?})",
        pulls.len()
    );
    assert!(
        gaps.last().is_some_and(|g| *g >= Duration::from_secs(3)),
        "the pulls back off: {gaps:?}"
    );
    let started: Vec<String> = events(runs.path())
        .into_iter()
        .filter(|e| e.what == "start")
        .map(|e| e.task)
        .collect();
    assert_eq!(started, ["during"], "nothing pulled while refused");

    p.front.set_policy(Policy::Accept);
    readyz(&addr, 200, Duration::from_secs(15), &worker).await;
    for id in ["during", "meanwhile-1", "meanwhile-2"] {
        wait_for_event(runs.path(), 30, &format!("{id} to run after"), |e| {
            e.what == "end" && e.task == id && e.at_ms > epoch_ms(revoked_at)
        })
        .await;
    }
    let events = result_events(&p.world, Duration::from_secs(4)).await;
    for id in ["during", "meanwhile-1", "meanwhile-2"] {
        assert!(
            events.contains(&(id.into(), "succeeded".into())),
            "{id} succeeded: {events:?}"
        );
    }
}

/// The token endpoint down (GKE's metadata server restarting): the worker
/// sends no call without a token, counts its pulls as `unavailable` (not
/// as a refusal), is not ready, and starts work once tokens come again.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_outage_is_waited_out() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        recording_handler("work", runs.path(), "cpu")
    );
    let p = Production::new("no-token", &extra, Duration::from_secs(60));
    p.world.setup().await;
    p.world
        .publish(&[task("work", "waiting", r#"{"seconds": 0}"#)])
        .await;
    p.front.set_token_endpoint_up(false);
    let worker = p.worker("w1");
    let addr = worker.http_addr().await;
    let label = &p.world.config.executors["cpu"].subscription;
    let unavailable =
        format!("leasehold_pull_errors_total{{code=\"unavailable\",subscription=\"{label}\"}}");
    eventually(
        Duration::from_secs(20),
        "pull errors counted as unavailable",
        || {
            http_get(&addr, "/metrics")
                .is_ok_and(|(_, m)| sample(&m, &unavailable).is_some_and(|n| n >= 2.0))
        },
    )
    .await;
    assert_eq!(http_get(&addr, "/readyz").unwrap().0, 503);
    assert!(
        p.front.calls().is_empty(),
        "no call without a token: {:#?}",
        p.front.calls()
    );
    assert!(
        worker.log().contains("cannot get an access token"),
        "{}",
        worker.log()
    );
    assert!(events(runs.path()).is_empty());

    p.front.set_token_endpoint_up(true);
    readyz(&addr, 200, Duration::from_secs(20), &worker).await;
    wait_for_event(runs.path(), 15, "the task to run", |e| {
        e.what == "end" && e.task == "waiting"
    })
    .await;
}

/// Wall-clock milliseconds of an `Instant` in the past, as the recording
/// handler writes them.
fn epoch_ms(at: Instant) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(now.checked_sub(at.elapsed()).unwrap().as_millis()).unwrap()
}

/// A worker that does not trust the endpoint's certificate stops at start
/// with exit 69 and a line naming the endpoint, instead of running unready.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_is_a_start_up_error_naming_the_endpoint() {
    let p = Production::new("wrong-ca", "", Duration::from_secs(60));
    p.world.setup().await;
    let wrong = p.world.path("other-ca.pem");
    google_front::write_unrelated_ca(&wrong);
    for args in [&["run"][..], &["setup"], &["publish", "--kind", "noop"]] {
        let command = p.leasehold_trusting(args, &wrong, p.front.adc_file_plain_token());
        let mut process = WorkerProcess::spawn(command, p.world.path("wrong.log"));
        let status = process.wait_timeout(Duration::from_secs(30));
        let log = process.log();
        assert_eq!(status.and_then(|s| s.code()), Some(69), "{args:?}: {log}");
        assert!(
            log.contains(&p.front.endpoint()),
            "{args:?} names the endpoint: {log}"
        );
        assert!(log.contains("certificate"), "{args:?} says why: {log}");
    }
}

/// A worker whose role lacks `pubsub.subscriptions.get` cannot check its
/// subscription at start: it says so once and runs. A message that then
/// arrives without a delivery count (the subscription has no dead-letter
/// policy) is dead-lettered on its first failure with the reason, never
/// retried forever.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_subscriptions_are_warned_about_and_uncounted_failures_dead_lettered_once() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let script = format!("echo run >> {}; exit 3", runs.path().display());
    let extra = format!(
        "[handlers.broken]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", {}]\n\
         [retry]\nmax_attempts = 3\nmin_backoff = \"1s\"\nmax_backoff = \"2s\"\n",
        toml_string(&script)
    );
    let p = Production::new("unreadable", &extra, Duration::from_secs(300));
    p.world.setup().await;
    // Someone else's subscription: no dead-letter policy, so no delivery count.
    let sub = p.world.cpu_subscription();
    p.world
        .conn
        .subscription_admin()
        .await
        .unwrap()
        .update_subscription()
        .set_subscription(
            google_cloud_pubsub::model::Subscription::new()
                .set_name(&sub)
                .set_topic(
                    p.world
                        .conn
                        .topic_path(&p.world.config.executors["cpu"].topic),
                ),
        )
        .set_update_mask(google_cloud_wkt::FieldMask::default().set_paths(["dead_letter_policy"]))
        .send()
        .await
        .unwrap();
    p.front.set_policy(Policy::RefuseMethod(
        "Subscriber/GetSubscription".into(),
        PERMISSION_DENIED,
    ));
    let worker = p.worker("w1");
    p.world.publish(&[task("broken", "b-1", "{}")]).await;
    let dead = p
        .world
        .subscription(&p.world.config.pubsub.dead_letter_topic);
    let mut got = Vec::new();
    let start = Instant::now();
    while got.is_empty() && start.elapsed() < Duration::from_secs(30) {
        got = p.world.pull_for(&dead, Duration::from_secs(1)).await;
    }
    assert_eq!(got.len(), 1, "{}", worker.log());
    let attributes = &got[0].message.as_ref().unwrap().attributes;
    let reason = &attributes["leasehold_error"];
    assert!(reason.contains("no delivery attempt"), "{reason}");
    // Nothing more: no retry loop.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(lines(runs.path()).len(), 1, "ran once");
    let log = worker.log();
    assert_eq!(
        log.matches("may not read the subscription").count(),
        1,
        "warned once: {log}"
    );
}

/// Credentials refused for good (a refresh token the endpoint answers with
/// `invalid_grant`): google-cloud-auth never tries again in this process,
/// so the worker fails liveness (`/healthz` 503) to be restarted, instead of
/// sitting unready forever while looking alive.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_refused_for_good_fail_liveness() {
    let p = Production::new("invalid-grant", "", Duration::from_secs(300));
    p.world.setup().await;
    let mut adc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.front.adc_file()).unwrap()).unwrap();
    adc["refresh_token"] = "revoked-refresh-token".into();
    let bad_adc = p.world.path("revoked-adc.json");
    std::fs::write(&bad_adc, adc.to_string()).unwrap();
    let command = p.leasehold_trusting(&["run"], p.front.ca_file(), &bad_adc);
    let worker = WorkerProcess::spawn(command, p.world.path("w1.log"));
    let addr = worker.http_addr().await;
    let start = Instant::now();
    loop {
        if http_get(&addr, "/healthz").is_ok_and(|(s, _)| s == 503) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "/healthz never failed\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        worker.log().contains("failing liveness"),
        "{}",
        worker.log()
    );
}
