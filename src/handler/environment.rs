//! The task as an exec handler sees it: `LEASEHOLD_*` variables.
//!
//! Checked here, where the variables are made, and not when a task is
//! decoded: builtins take no environment, so an attribute an environment
//! cannot hold is no reason to refuse them a task. What cannot be passed
//! faithfully is a permanent failure naming the attribute: a NUL byte (the
//! end of a C string: `execve` refuses it, and retrying cannot help), and
//! two attribute names that map to the same variable (one would silently
//! overwrite the other).

use std::collections::BTreeMap;

use crate::handler::Failure;
use crate::task::Task;

/// The `LEASEHOLD_ATTR_` name of an attribute: upper-cased,
/// non-alphanumerics replaced by `_`.
pub fn attribute_variable(key: &str) -> String {
    let mut name = String::from("LEASEHOLD_ATTR_");
    name.extend(key.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

/// The task's variables, as the handler contract lists them (the task
/// directory's and the device's are added by their owners), or why the
/// task cannot be given to a command.
pub fn task_environment(task: &Task) -> Result<Vec<(String, String)>, Failure> {
    let mut env = vec![
        ("LEASEHOLD_TASK_ID".to_string(), task.task_id.clone()),
        ("LEASEHOLD_KIND".to_string(), task.kind.clone()),
        ("LEASEHOLD_MESSAGE_ID".to_string(), task.message_id.clone()),
        ("LEASEHOLD_ATTEMPT".to_string(), task.attempt.to_string()),
        (
            "LEASEHOLD_INTERRUPTIONS".to_string(),
            task.interruptions.to_string(),
        ),
    ];
    if let Some(t) = task.publish_time {
        env.push((
            "LEASEHOLD_PUBLISH_TIME".to_string(),
            crate::results::rfc3339(t),
        ));
    }
    for (what, value) in [("task id", &task.task_id), ("kind", &task.kind)] {
        if value.contains('\0') {
            return Err(bad(format!("the {what} has a NUL byte")));
        }
    }
    let mut names: BTreeMap<String, &str> = BTreeMap::new();
    for (key, value) in &task.attributes {
        if key.contains('\0') {
            return Err(bad(format!("the attribute name {key:?} has a NUL byte")));
        }
        if value.contains('\0') {
            return Err(bad(format!(
                "attribute {key:?} has a NUL byte in its value"
            )));
        }
        let name = attribute_variable(key);
        if let Some(other) = names.insert(name.clone(), key) {
            return Err(bad(format!(
                "attributes {other:?} and {key:?} both map to the variable {name}"
            )));
        }
        env.push((name, value.clone()));
    }
    Ok(env)
}

fn bad(reason: String) -> Failure {
    Failure::BadAttributes(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(attrs: &[(&str, &str)]) -> Task {
        let mut a: BTreeMap<String, String> = attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        a.insert("kind".into(), "k".into());
        Task::decode("m-1".into(), a, vec![], 1, None).unwrap()
    }

    #[test]
    fn attribute_variables_are_upper_cased_and_sanitized() {
        assert_eq!(attribute_variable("scene"), "LEASEHOLD_ATTR_SCENE");
        assert_eq!(
            attribute_variable("out.path-2"),
            "LEASEHOLD_ATTR_OUT_PATH_2"
        );
        assert_eq!(attribute_variable("café"), "LEASEHOLD_ATTR_CAF_");
    }

    #[test]
    fn every_attribute_becomes_a_variable() {
        let env = task_environment(&task(&[("scene", "s1"), ("out.path", "/x")])).unwrap();
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["LEASEHOLD_ATTR_SCENE"], "s1");
        assert_eq!(env["LEASEHOLD_ATTR_OUT_PATH"], "/x");
        assert_eq!(env["LEASEHOLD_TASK_ID"], "m-1");
        assert_eq!(env["LEASEHOLD_ATTEMPT"], "1");
    }

    #[test]
    fn colliding_names_and_nul_bytes_are_permanent_failures_naming_the_attribute() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[("a.b", "1"), ("a_b", "2")],
                r#"attributes "a.b" and "a_b" both map to the variable LEASEHOLD_ATTR_A_B"#,
            ),
            (
                &[("Scene", "1"), ("scene", "2")],
                "both map to the variable LEASEHOLD_ATTR_SCENE",
            ),
            (&[("é", "1"), ("_", "2")], "LEASEHOLD_ATTR__"),
            (
                &[("scene", "a\0b")],
                r#"attribute "scene" has a NUL byte in its value"#,
            ),
            (
                &[("sc\0ene", "a")],
                r#"the attribute name "sc\0ene" has a NUL byte"#,
            ),
        ];
        for (attrs, want) in cases {
            let failure = task_environment(&task(attrs)).unwrap_err();
            assert!(failure.is_permanent(), "{attrs:?}");
            let text = failure.to_string();
            assert!(text.contains(want), "{attrs:?}: {text}");
        }
        let mut t = task(&[]);
        t.task_id = "t\0".into();
        assert!(
            task_environment(&t)
                .unwrap_err()
                .to_string()
                .contains("task id has a NUL byte")
        );
    }
}
