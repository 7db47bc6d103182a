use super::*;

/// Every (line, cut) a splitter emits for `chunks`.
fn split(max: usize, chunks: &[&[u8]]) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    let mut s = LineSplitter::new(max);
    let mut emit = |line: &[u8], cut: bool| {
        got.push((String::from_utf8_lossy(line).into_owned(), cut));
    };
    for chunk in chunks {
        s.push(chunk, &mut emit);
    }
    s.finish(&mut emit);
    got
}

fn lines(pairs: &[&str]) -> Vec<(String, bool)> {
    pairs.iter().map(|l| ((*l).to_string(), false)).collect()
}

#[test]
fn lines_end_at_newline_carriage_return_or_both() {
    assert_eq!(split(100, &[b"a\nb\rc\r\nd"]), lines(&["a", "b", "c", "d"]));
    // A \r\n split across reads is still one line end.
    assert_eq!(split(100, &[b"a\r", b"\nb\n"]), lines(&["a", "b"]));
    // A progress bar.
    assert_eq!(
        split(100, &[b"10%\r20%\r", b"30%\r"]),
        lines(&["10%", "20%", "30%"])
    );
    // Empty lines are emitted (the sink skips them); \r\r is two ends.
    assert_eq!(split(100, &[b"\n\r\rx"]), lines(&["", "", "", "x"]));
}

#[test]
fn a_line_split_across_reads_is_joined() {
    assert_eq!(
        split(100, &[b"hel", b"lo wor", b"ld\nnext"]),
        lines(&["hello world", "next"])
    );
}

#[test]
fn a_long_line_is_cut_once_at_the_bound_and_the_rest_skipped() {
    let long = vec![b'x'; 25];
    assert_eq!(
        split(10, &[&long, b"\nafter\n"]),
        vec![("x".repeat(10), true), ("after".to_string(), false)]
    );
    // Across many reads, with no end at all: still one cut line, bounded.
    let mut s = LineSplitter::new(10);
    let mut n = 0;
    for _ in 0..1000 {
        s.push(&[b'y'; 7], &mut |line, cut| {
            assert_eq!((line.len(), cut), (10, true));
            n += 1;
        });
        assert!(s.held() <= 64, "the buffer stays bounded");
    }
    s.finish(&mut |_, _| n += 1);
    assert_eq!(n, 1);
    // Exactly the bound is not cut.
    assert_eq!(split(5, &[b"12345", b"\n"]), lines(&["12345"]));
}

#[test]
fn bytes_that_are_not_utf8_are_replaced_not_refused() {
    assert_eq!(
        split(100, &[b"caf\xe9\n\xff\xfe\n"]),
        lines(&["caf\u{fffd}", "\u{fffd}\u{fffd}"])
    );
}

#[test]
fn the_tail_keeps_the_last_bytes_as_text() {
    let mut t = Tail::new(8);
    t.push(b"first\n");
    t.push(b"second\nthird\n");
    assert_eq!(t.text(), "d\nthird");
    let mut t = Tail::new(100);
    t.push(b"a\r\nb\r\n");
    assert_eq!(t.text(), "a\nb");
    let mut t = Tail::new(4096);
    t.push(b"first\nboom\n");
    assert_eq!(t.text(), "first\nboom");
    let mut t = Tail::new(4096);
    t.push(b"caf\xe9\r50%\r");
    assert_eq!(t.text(), "caf\u{fffd}\n50%");
    // Replacement characters are longer than the bytes they replace: still
    // at most `keep` bytes, cut on a character boundary.
    let mut t = Tail::new(10);
    t.push(&[0xff; 10]);
    let text = t.text();
    assert!(text.len() <= 10, "{}", text.len());
    assert_eq!(text, "\u{fffd}".repeat(3));
    let mut t = Tail::new(0);
    t.push(b"anything");
    assert_eq!(t.text(), "");
}

/// Runs `body` with a subscriber of its own; returns what it logged once
/// `done` holds for it (the logger thread writes a moment later).
async fn logged<F: std::future::Future<Output = String>>(
    body: F,
    done: impl Fn(&str) -> bool,
) -> (String, String) {
    use tracing::instrument::WithSubscriber;
    let file = tempfile::NamedTempFile::new().unwrap();
    let text = || String::from_utf8_lossy(&std::fs::read(file.path()).unwrap()).into_owned();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(Arc::new(file.reopen().unwrap()))
        .with_ansi(false)
        .finish();
    let tail = body.with_subscriber(subscriber).await;
    for _ in 0..200 {
        if done(&text()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (text(), tail)
}

#[tokio::test]
async fn lines_reach_the_log_in_the_task_span_and_the_tail_comes_back() {
    let input: &[u8] = b"caf\xe9\nprogress 1\rprogress 2\r\nlast";
    let (log, tail) = logged(
        async {
            let span = tracing::info_span!("task", task_id = "t-9");
            let _entered = span.enter();
            forward(input, "stderr", 4096).await.unwrap()
        },
        |log| log.contains("last"),
    )
    .await;
    assert_eq!(tail, "caf\u{fffd}\nprogress 1\nprogress 2\nlast");
    for line in ["caf\u{fffd}", "progress 1", "progress 2", "last"] {
        let found = log
            .lines()
            .find(|l| l.contains(&format!(": {line} stream=\"stderr\"")))
            .unwrap_or_else(|| panic!("{line:?} not in {log}"));
        assert!(found.contains("task{task_id=\"t-9\"}"), "{found}");
    }
}

#[tokio::test]
async fn a_line_over_the_bound_is_logged_cut_with_a_marker() {
    let mut input = vec![b'z'; 3 * MAX_LINE_BYTES];
    input.extend_from_slice(b"\nshort\n");
    let (log, tail) = logged(
        async move {
            forward(std::io::Cursor::new(input), "stdout", 0)
                .await
                .unwrap()
        },
        |log| log.contains("short"),
    )
    .await;
    assert_eq!(tail, "");
    let cut = log
        .lines()
        .find(|l| l.contains("zzz"))
        .unwrap_or_else(|| panic!("no cut line in {} bytes of log", log.len()));
    assert!(
        cut.contains("[… cut: the line is longer than 64 KiB]"),
        "{}",
        &cut[cut.len() - 80..]
    );
    assert_eq!(cut.matches('z').count(), MAX_LINE_BYTES);
    assert!(log.contains("short"));
}

#[tokio::test(start_paused = true)]
async fn a_stream_logs_a_burst_then_a_steady_rate() {
    let start = Instant::now();
    let mut budget = LineBudget::new(start);
    let mut taken = 0;
    while budget.take() {
        taken += 1;
    }
    assert_eq!(taken, BURST_LINES);
    budget.refill(start + Duration::from_millis(500));
    let mut more = 0;
    while budget.take() {
        more += 1;
    }
    assert_eq!(more, LINES_PER_SECOND / 2);
    // Idle for long: back to the burst, no more.
    budget.refill(start + Duration::from_secs(3600));
    let mut after_idle = 0;
    while budget.take() {
        after_idle += 1;
    }
    assert_eq!(after_idle, BURST_LINES);
}

#[tokio::test]
async fn a_flood_is_dropped_and_counted_never_queued_without_bound() {
    // Far more lines at once than the burst and the queue hold.
    let lines = 3 * BURST_LINES as usize;
    let input: Vec<u8> = (0..lines)
        .flat_map(|i| format!("l{i}\n").into_bytes())
        .collect();
    let dropped_sum = |log: &str| -> u64 {
        log.lines()
            .filter_map(|l| l.split("dropped_lines=").nth(1))
            .map(|n| n.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let (log, _) = logged(
        async move {
            forward(std::io::Cursor::new(input), "stdout", 0)
                .await
                .unwrap()
        },
        |log| dropped_sum(log) >= u64::from(2 * BURST_LINES),
    )
    .await;
    let dropped = dropped_sum(&log);
    assert!(log.contains("lines of the handler's stdout were not logged"));
    assert!(dropped >= u64::from(2 * BURST_LINES), "{dropped} dropped");
    assert!(dropped < lines as u64, "{dropped} dropped");
}

#[tokio::test]
async fn finish_gives_up_on_a_pipe_held_open() {
    let (_writer, reader) = tokio::io::duplex(64);
    let handle = forward(reader, "stdout", 0);
    let started = tokio::time::Instant::now();
    assert_eq!(finish(Some(handle), "stdout").await, "");
    let waited = started.elapsed();
    assert!(
        waited >= PIPE_GRACE && waited < PIPE_GRACE * 2,
        "{waited:?}"
    );
}
