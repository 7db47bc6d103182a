use super::*;

fn load_str(toml: &str) -> Result<Config, ConfigError> {
    load_with(toml, &[])
}

fn load_with(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(&[path], &Environment::from_pairs(env.iter().copied()))
}

fn key_of(e: ConfigError) -> String {
    match e {
        ConfigError::Invalid { key, .. } => key,
        ConfigError::Read(m) => panic!("expected a key to be named: {m}"),
    }
}

#[test]
fn defaults_are_design_md_values() {
    let c = Config::load(&[], &Environment::default()).unwrap();
    assert_eq!(c.pubsub.project, "local-project");
    assert_eq!(c.pubsub.ack_deadline, Duration::from_secs(60));
    assert_eq!(c.lease.extension, Duration::from_secs(60));
    assert_eq!(c.lease.max_lease, Duration::from_secs(24 * 3600));
    assert_eq!(c.retry.max_attempts, 6);
    assert_eq!(c.retry.min_backoff, Duration::from_secs(10));
    assert_eq!(c.retry.max_backoff, Duration::from_secs(360));
    assert!(c.executors["cpu"].enabled);
    assert!(!c.executors["gpu"].enabled);
    assert_eq!(c.executors["gpu"].devices, Some(Devices::Auto));
    assert_eq!(c.shutdown.grace, Duration::from_secs(25));
    assert_eq!(c.shutdown.kill_grace, Duration::from_secs(5));
    assert_eq!(c.max_delivery_attempts(), 8);
}

#[test]
fn every_design_key_is_accepted() {
    let c = load_str(
        r#"
[pubsub]
project = "p1"
endpoint = "https://pubsub.example:443"
results_topic = ""
dead_letter_topic = "dead-letters"
ack_deadline = "10s"
[lease]
extension = "30s"
max_lease = "4h"
[retry]
max_attempts = 3
min_backoff = "1s"
max_backoff = "1m"
[executors.cpu]
enabled = true
topic = "t-cpu"
subscription = "s-cpu"
slots = 3
[executors.gpu]
enabled = true
topic = "t-gpu"
subscription = "s-gpu"
devices = ["0", "1"]
[handlers.reduce]
executor = "cpu"
command = ["/opt/leasehold/reduce.sh", "--fast"]
timeout = "2h"
permanent_exit_codes = [65, 66]
stall_timeout = "10m"
progress_interval = "10s"
[handlers.render]
executor = "gpu"
command = ["render"]
env = { QUALITY = "high" }
[http]
listen = "0.0.0.0:9090"
[shutdown]
grace = "1m"
kill_grace = "10s"
"#,
    )
    .unwrap();
    assert_eq!(c.executors["cpu"].slots, 3);
    assert_eq!(
        c.executors["gpu"].devices,
        Some(Devices::List(vec!["0".into(), "1".into()]))
    );
    let reduce = &c.handlers["reduce"];
    assert_eq!(reduce.executor, "cpu");
    assert_eq!(reduce.timeout, Some(Duration::from_secs(7200)));
    assert_eq!(reduce.permanent_exit_codes, vec![65, 66]);
    assert_eq!(reduce.stall_timeout, Some(Duration::from_secs(600)));
    assert_eq!(reduce.progress_interval, Some(Duration::from_secs(10)));
    assert_eq!(c.handlers["render"].env["QUALITY"], "high");
    assert_eq!(c.enabled_executors().count(), 2);
}

#[test]
fn bad_values_name_their_key() {
    let cases: &[(&str, &str)] = &[
        ("[executors.cpu]\nslot = 3", "executors.cpu.slot"),
        ("[bogus]\nx = 1", "bogus"),
        ("[executors.cpu]\nslots = \"many\"", "executors.cpu.slots"),
        ("[lease]\nextension = \"forever\"", "lease.extension"),
        ("[lease]\nextension = \"5s\"", "lease.extension"),
        ("[lease]\nmax_lease = \"30s\"", "lease.max_lease"),
        ("[pubsub]\nack_deadline = \"11m\"", "pubsub.ack_deadline"),
        ("[pubsub]\nproject = \"\"", "pubsub.project"),
        ("[pubsub]\nendpoint = \"pubsub.example\"", "pubsub.endpoint"),
        (
            "[pubsub]\ndead_letter_topic = \"x\"",
            "pubsub.dead_letter_topic",
        ),
        ("[retry]\nmax_attempts = 0", "retry.max_attempts"),
        ("[retry]\nmax_backoff = \"1s\"", "retry.max_backoff"),
        ("[retry]\nmax_backoff = \"20m\"", "retry.max_backoff"),
        ("[executors.cpu]\ntopic = \"goog-x\"", "executors.cpu.topic"),
        ("[executors.cpu]\nenabled = false", "executors"),
        (
            "[executors.gpu]\nenabled = true\ndevices = []",
            "executors.gpu.devices",
        ),
        (
            "[executors.gpu]\ndevices = [\"0\", \"0\"]",
            "executors.gpu.devices",
        ),
        (
            "[executors.gpu]\nenabled = true\ntopic = \"leasehold-tasks-cpu\"",
            "executors.gpu.topic",
        ),
        (
            "[handlers.x]\nexecutor = \"tpu\"\nbuiltin = \"noop\"",
            "handlers.x.executor",
        ),
        ("[handlers.x]\nexecutor = \"cpu\"", "handlers.x"),
        (
            "[handlers.x]\nexecutor = \"cpu\"\nbuiltin = \"dance\"",
            "handlers.x.builtin",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\ncommand = []",
            "handlers.x.command",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\nbuiltin = \"noop\"\ncommand = [\"a\"]",
            "handlers.x",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\ncommand = [\"a\"]\npermanent_exit_codes = [0]",
            "handlers.x.permanent_exit_codes",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\ncommand = [\"a\"]\ntimeout = \"0s\"",
            "handlers.x.timeout",
        ),
        (
            "[lease]\nmax_lease = \"1h\"\n[handlers.x]\nexecutor = \"cpu\"\ncommand = [\"a\"]\ntimeout = \"2h\"",
            "handlers.x.timeout",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\ncommand = [\"a\"]\nretries = 3",
            "handlers.x.retries",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\ncommand = [\"a\"]\nstall_timeout = \"500ms\"",
            "handlers.x.stall_timeout",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\nbuiltin = \"sleep\"\nstall_timeout = \"1m\"",
            "handlers.x.stall_timeout",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\nbuiltin = \"sleep\"\nprogress_interval = \"1m\"",
            "handlers.x.progress_interval",
        ),
        (
            "[handlers.x]\nexecutor = \"cpu\"\ncommand = [\"a\"]\nenv = { A = \"x\\u0000y\" }",
            "handlers.x.env",
        ),
        ("[http]\nlisten = \"nowhere\"", "http.listen"),
        ("[shutdown]\nkill_grace = \"0s\"", "shutdown.kill_grace"),
    ];
    for (toml, key) in cases {
        let err = load_str(toml).expect_err(toml);
        let line = err.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(line.contains(&format!("`{key}`")), "{toml:?} -> {line}");
        assert_eq!(key_of(err), *key, "{toml:?}");
    }
}

#[test]
fn environment_overrides_files_and_names_bad_keys() {
    let c = load_with(
        "[executors.cpu]\nslots = 2",
        &[
            ("LEASEHOLD__EXECUTORS__CPU__SLOTS", "7"),
            ("LEASEHOLD__LEASE__EXTENSION", "2m"),
            ("LEASEHOLD__EXECUTORS__GPU__DEVICES", "0,1"),
        ],
    )
    .unwrap();
    assert_eq!(c.executors["cpu"].slots, 7);
    assert_eq!(c.lease.extension, Duration::from_secs(120));
    assert_eq!(
        c.executors["gpu"].devices,
        Some(Devices::List(vec!["0".into(), "1".into()]))
    );
    let err = load_with("", &[("LEASEHOLD__EXECUTORS__CPU__SLOTS", "abc")]).unwrap_err();
    assert_eq!(key_of(err), "executors.cpu.slots");
    let err = load_with("", &[("LEASEHOLD__EXECUTORS__CPU__SLOTZ", "3")]).unwrap_err();
    assert_eq!(key_of(err), "executors.cpu.slotz");
}

#[test]
fn google_cloud_project_sits_between_defaults_and_files() {
    let c = load_with("", &[("GOOGLE_CLOUD_PROJECT", "from-env")]).unwrap();
    assert_eq!(c.pubsub.project, "from-env");
    let c = load_with(
        "[pubsub]\nproject = \"from-file\"",
        &[("GOOGLE_CLOUD_PROJECT", "from-env")],
    )
    .unwrap();
    assert_eq!(c.pubsub.project, "from-file");
}

#[test]
fn later_files_win_and_missing_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, "[executors.cpu]\nslots = 2").unwrap();
    std::fs::write(&b, "[executors.cpu]\nslots = 5").unwrap();
    let c = Config::load(&[a.clone(), b], &Environment::default()).unwrap();
    assert_eq!(c.executors["cpu"].slots, 5);
    let err = Config::load(&[dir.path().join("none.toml")], &Environment::default()).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn shipped_configs_are_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/dev.toml");
    Config::load(&[path], &Environment::default()).unwrap_or_else(|e| panic!("dev.toml: {e}"));
}
