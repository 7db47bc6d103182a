use std::io::Write;

use serde_json::json;

use super::*;

fn append(path: &std::path::Path, text: &[u8]) {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap()
        .write_all(text)
        .unwrap();
}

fn message(r: &Poll) -> Option<Value> {
    r.latest.as_ref().map(|r| r.0.clone())
}

#[test]
fn a_report_is_a_json_object_or_free_text() {
    let r = Report::parse(br#"{"fraction": 0.4, "message": "frame 12/30", "frame": 12}"#).unwrap();
    assert_eq!(r.fraction(), Some(0.4));
    assert_eq!(r.0["frame"], 12);
    let r = Report::parse(b"  rendering frame 3\r").unwrap();
    assert_eq!(r.0, json!({"message": "rendering frame 3"}));
    assert_eq!(r.fraction(), None);
    // JSON that is not an object is text too; bytes that are not UTF-8 are replaced.
    assert_eq!(Report::parse(b"0.5").unwrap().0, json!({"message": "0.5"}));
    assert_eq!(
        Report::parse(b"caf\xe9").unwrap().0,
        json!({"message": "caf\u{fffd}"})
    );
    assert_eq!(Report::parse(b"  \t"), None);
    // Fractions are clamped; anything but a number is no fraction.
    for (line, want) in [
        (r#"{"fraction": 1.5}"#, Some(1.0)),
        (r#"{"fraction": -2}"#, Some(0.0)),
        (r#"{"fraction": "0.5"}"#, None),
        (r#"{"fraction": null}"#, None),
    ] {
        assert_eq!(
            Report::parse(line.as_bytes()).unwrap().fraction(),
            want,
            "{line}"
        );
    }
    // A long line is cut: no longer JSON, kept as (cut) text.
    let long = format!(r#"{{"message": "{}"}}"#, "x".repeat(10_000));
    let r = Report::parse(long.as_bytes()).unwrap();
    assert_eq!(r.0["message"].as_str().unwrap().len(), MAX_REPORT_BYTES);
}

#[test]
fn each_poll_gives_the_latest_complete_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress");
    std::fs::write(&path, b"written before the start\n").unwrap();
    let mut file = ProgressFile::new(path.clone());
    assert_eq!(file.poll(), Poll::default(), "nothing new");
    append(&path, b"one\ntwo\n{\"fraction\": 0.2}\n");
    let p = file.poll();
    assert!(p.heartbeat);
    assert_eq!(message(&p), Some(json!({"fraction": 0.2})));
    assert_eq!(file.poll(), Poll::default());
    // A line without its end yet: a heartbeat, no report until the end comes.
    append(&path, b"half");
    let p = file.poll();
    assert_eq!((p.heartbeat, message(&p)), (true, None));
    append(&path, b" done\n");
    assert_eq!(message(&file.poll()), Some(json!({"message": "half done"})));
}

#[test]
fn a_rewritten_or_replaced_file_is_read_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress");
    std::fs::write(&path, b"").unwrap();
    let mut file = ProgressFile::new(path.clone());
    append(&path, b"a long first report\n");
    file.poll();
    // `echo x > file`: shorter than before.
    std::fs::write(&path, b"second\n").unwrap();
    assert_eq!(message(&file.poll()), Some(json!({"message": "second"})));
    // Replaced by a rename: another inode.
    let tmp = dir.path().join("tmp");
    std::fs::write(&tmp, b"third, longer than before\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(
        message(&file.poll()),
        Some(json!({"message": "third, longer than before"}))
    );
    // Removed: nothing, and no error.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(file.poll(), Poll::default());
}

#[test]
fn a_poll_reads_a_bounded_amount_however_much_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress");
    std::fs::write(&path, b"").unwrap();
    let mut file = ProgressFile::new(path.clone());
    let mut big = Vec::new();
    for i in 0..200_000 {
        big.extend_from_slice(format!("frame {i}\n").as_bytes());
    }
    // And a partial line of 1 MB after it.
    big.extend(std::iter::repeat_n(b'p', 1 << 20));
    append(&path, &big);
    let p = file.poll();
    assert_eq!(message(&p), None, "the end is a partial line");
    assert!(file.partial.len() <= MAX_REPORT_BYTES);
    append(&path, b"\nlast\n");
    assert_eq!(message(&file.poll()), Some(json!({"message": "last"})));

    let mut file = ProgressFile::new(path.clone());
    let mut lines = Vec::new();
    for i in 0..200_000 {
        lines.extend_from_slice(format!("frame {i}\n").as_bytes());
    }
    append(&path, &lines);
    assert_eq!(
        message(&file.poll()),
        Some(json!({"message": "frame 199999"}))
    );
    assert_eq!(file.offset, std::fs::metadata(&path).unwrap().len());
}

#[tokio::test(start_paused = true)]
async fn at_most_one_report_per_interval_and_the_latest_wins() {
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let mut t = Throttle::new(Duration::from_secs(10));
    assert_eq!(t.due(at(0)), None, "nothing to say");
    t.offer(Report(json!({"n": 1})));
    assert_eq!(
        t.due(at(0)),
        Some(Report(json!({"n": 1}))),
        "the first at once"
    );
    t.offer(Report(json!({"n": 2})));
    t.offer(Report(json!({"n": 3})));
    assert_eq!(t.due(at(5)), None);
    assert_eq!(t.due(at(10)), Some(Report(json!({"n": 3}))));
    assert_eq!(t.due(at(30)), None, "published once");
    t.offer(Report(json!({"n": 4})));
    assert_eq!(t.due(at(30)), Some(Report(json!({"n": 4}))));
}

fn recording_sink() -> (ProgressSink, prometheus::Gauge, Arc<Mutex<Vec<Value>>>) {
    let gauge = prometheus::Gauge::new("g", "g").unwrap();
    let published = Arc::new(Mutex::new(Vec::new()));
    let sink = ProgressSink::new(gauge.clone(), {
        let published = published.clone();
        move |v: &Value| published.lock().unwrap().push(v.clone())
    });
    (sink, gauge, published)
}

#[tokio::test]
async fn the_sink_moves_the_gauge_keeps_the_latest_and_resets_at_the_end() {
    let (sink, gauge, published) = recording_sink();
    sink.observe(&Report(json!({"fraction": 0.25})));
    sink.observe(&Report(json!({"message": "no fraction"})));
    assert!((gauge.get() - 0.25).abs() < 1e-9);
    assert_eq!(sink.latest(), Some(json!({"message": "no fraction"})));
    sink.publish(&Report(json!({"fraction": 0.25})));
    assert_eq!(*published.lock().unwrap(), vec![json!({"fraction": 0.25})]);
    let clone = sink.clone();
    drop(sink);
    assert!(gauge.get() > 0.0, "a clone still runs");
    drop(clone);
    assert!(gauge.get().abs() < f64::EPSILON, "the task ended");
}

#[tokio::test]
async fn a_watch_publishes_reports_and_says_when_the_task_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress");
    std::fs::write(&path, b"").unwrap();
    let (sink, gauge, published) = recording_sink();
    let mut watch = ProgressWatch::new(
        path.clone(),
        Duration::ZERO,
        Some(Duration::from_millis(300)),
        sink,
    );
    append(&path, b"{\"fraction\": 0.5}\n");
    assert!(!watch.tick().await);
    assert!((gauge.get() - 0.5).abs() < 1e-9);
    assert_eq!(published.lock().unwrap().len(), 1);
    assert!(!watch.tick().await, "not yet");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(watch.tick().await, "no change for the stall timeout");
    append(&path, b"alive\n");
    assert!(!watch.tick().await, "a report is a heartbeat");
    append(&path, b"the end\n");
    watch.finish().await;
    assert_eq!(
        published.lock().unwrap().len(),
        2,
        "the last look publishes nothing"
    );
    assert_eq!(watch.sink.latest(), Some(json!({"message": "the end"})));
}
