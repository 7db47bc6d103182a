use super::*;

const SEC: Duration = Duration::from_secs(1);

fn book() -> LeaseBook {
    LeaseBook::new(60 * SEC, 3600 * SEC)
}

fn s(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|i| (*i).to_string()).collect()
}

#[test]
fn first_round_is_due_two_thirds_into_the_ack_deadline() {
    let t0 = Instant::now();
    let mut b = book();
    assert_eq!(b.next_round(), None);
    b.add("a".into(), t0, 10 * SEC);
    b.add("b".into(), t0 + 3 * SEC, 10 * SEC);
    assert_eq!(b.next_round(), Some(t0 + 10 * SEC * 2 / 3));
    assert_eq!(b.next_expiry(), Some(t0 + 10 * SEC));
}

#[test]
fn a_round_extends_every_live_lease_and_marks_it_in_flight() {
    let t0 = Instant::now();
    let mut b = book();
    for i in 0..6_000 {
        b.add(format!("id-{i:05}"), t0, 10 * SEC);
    }
    b.add("late".into(), t0 + 5 * SEC, 10 * SEC);
    let round = b.round(t0 + 7 * SEC);
    assert_eq!(round.due.len(), 6_001, "the later lease rides along");
    assert!(round.lost.is_empty() && round.past_max_lease.is_empty());
    // While the batch is in flight no new round is due, nor sends it again.
    assert_eq!(b.next_round(), None);
    let again = b.round(t0 + 8 * SEC);
    assert!(again.due.is_empty());
}

#[test]
fn extended_leases_run_from_the_send_time() {
    let t0 = Instant::now();
    let mut b = book();
    b.add("a".into(), t0, 10 * SEC);
    let sent = t0 + 7 * SEC;
    let round = b.round(sent);
    b.extended(&round.due, sent);
    assert_eq!(b.next_expiry(), Some(sent + 60 * SEC));
    assert_eq!(b.next_round(), Some(sent + 40 * SEC));
}

#[test]
fn a_lease_past_its_deadline_is_lost_for_good() {
    let t0 = Instant::now();
    let mut b = book();
    b.add("a".into(), t0, 10 * SEC);
    let round = b.round(t0 + 7 * SEC);
    b.failed(&round.due, t0 + 8 * SEC);
    assert_eq!(b.next_round(), Some(t0 + 9 * SEC));
    assert!(b.take_lost(t0 + 9 * SEC).is_empty());
    assert_eq!(b.take_lost(t0 + 10 * SEC), s(&["a"]));
    assert!(b.take_lost(t0 + 11 * SEC).is_empty(), "reported once");
    assert!(b.contains("a"), "held until its task ends it");
    // Never extended again, even if an extension sent before now succeeds.
    assert_eq!(b.next_round(), None);
    assert!(b.round(t0 + 12 * SEC).due.is_empty());
    b.extended(&s(&["a"]), t0 + 9 * SEC);
    assert_eq!(b.next_expiry(), None, "a lost lease stays lost");
}

#[test]
fn a_round_that_finds_a_deadline_passed_reports_it_lost_instead_of_extending_it() {
    // A worker frozen (SIGSTOP) past the deadline: when it wakes, the round
    // comes first, and must not revive the lease.
    let t0 = Instant::now();
    let mut b = book();
    b.add("a".into(), t0, 10 * SEC);
    b.add("b".into(), t0 + 9 * SEC, 10 * SEC);
    let round = b.round(t0 + 15 * SEC);
    assert_eq!(round.lost, s(&["a"]));
    assert_eq!(round.due, s(&["b"]));
}

#[test]
fn retries_back_off_but_come_before_the_deadline() {
    let t0 = Instant::now();
    let mut b = LeaseBook::new(60 * SEC, 3600 * SEC);
    b.add("a".into(), t0, 120 * SEC);
    let ids = s(&["a"]);
    // Far from the deadline: 1 s, 2 s, 4 s, 8 s, 16 s, 16 s.
    let mut now = t0;
    let mut gaps = Vec::new();
    for _ in 0..6 {
        b.failed(&ids, now);
        let next = b.next_round().unwrap();
        gaps.push((next - now).as_secs());
        now = next;
    }
    assert_eq!(gaps, vec![1, 2, 4, 8, 16, 16]);
    // 10 s before the deadline: halfway to it at most.
    let late = t0 + 110 * SEC;
    b.failed(&ids, late);
    assert_eq!(b.next_round(), Some(late + 5 * SEC));
    // Close to the deadline: not sooner than 100 ms.
    let near = t0 + 120 * SEC - Duration::from_millis(50);
    b.failed(&ids, near);
    assert_eq!(b.next_round(), Some(near + Duration::from_millis(100)));
    // A success resets the backoff.
    b.extended(&ids, near);
    b.failed(&ids, near + SEC);
    assert_eq!(b.next_round(), Some(near + 2 * SEC));
}

#[test]
fn a_lease_reaching_max_lease_is_flagged_once_and_still_extended() {
    let t0 = Instant::now();
    let mut b = LeaseBook::new(60 * SEC, 120 * SEC);
    b.add("old".into(), t0, 10 * SEC);
    b.extended(&s(&["old"]), t0 + 100 * SEC);
    b.add("new".into(), t0 + 115 * SEC, 10 * SEC);
    let round = b.round(t0 + 121 * SEC);
    assert_eq!(round.past_max_lease, s(&["old"]));
    assert_eq!(
        round.due,
        s(&["new", "old"]),
        "kept alive while its task stops"
    );
    b.extended(&round.due, t0 + 121 * SEC);
    assert!(
        b.round(t0 + 170 * SEC).past_max_lease.is_empty(),
        "flagged once"
    );
}

#[test]
fn removed_leases_are_not_extended_and_say_whether_an_extension_was_in_flight() {
    let t0 = Instant::now();
    let mut b = book();
    b.add("a".into(), t0, 10 * SEC);
    b.add("b".into(), t0, 10 * SEC);
    assert_eq!(
        b.remove("a"),
        Some(Removed {
            in_flight: false,
            expires: t0 + 10 * SEC
        })
    );
    assert_eq!(b.remove("a"), None);
    let round = b.round(t0 + 7 * SEC);
    assert_eq!(round.due, s(&["b"]));
    assert!(b.remove("b").unwrap().in_flight);
    assert!(b.is_empty());
}

#[test]
fn refused_ids_are_lost_and_the_others_extended() {
    let t0 = Instant::now();
    let mut b = book();
    b.add("a".into(), t0, 10 * SEC);
    b.add("b".into(), t0, 10 * SEC);
    let round = b.round(t0 + 7 * SEC);
    assert_eq!(b.refused(&s(&["b"])), s(&["b"]));
    assert!(b.refused(&s(&["b"])).is_empty(), "reported once");
    b.extended(&s(&["a"]), t0 + 7 * SEC);
    assert_eq!(round.due.len(), 2);
    assert_eq!(b.next_expiry(), Some(t0 + 67 * SEC), "only a is live");
}
