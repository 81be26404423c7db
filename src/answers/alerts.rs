//! Alert rules: named yes/no questions asked about every sampled frame, the strict reading of
//! their answers, and the debounced per-job state that fires `alert.started` and
//! `alert.ended` on a change of state only.
//!
//! A rule set belongs to a scope (global, or one job) and is versioned as a whole, like a
//! prompt. The [`AlertTracker`] is the state of one job's alerts; the writer applies each
//! stored result's answers to it and the store saves it in the transaction that stores the
//! result, so a resumed job (after a crash, on another replica) goes on from exactly the state
//! its last stored result left, and every event is stored once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::Invalid;

/// Answers in a row that change an alert's state, when a rule does not say.
pub const DEFAULT_MIN_CONSECUTIVE: u32 = 2;
/// The largest `min_consecutive` a rule may ask for (the run is kept with the job's state).
pub const MAX_MIN_CONSECUTIVE: u32 = 100;
const MAX_NAME_LEN: usize = 64;
/// How much of an answer that is neither yes nor no is kept with the result.
const MAX_RAW_CHARS: usize = 200;

/// One alert: a name, the question asked about each frame, and how many answers in a row
/// change its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRule {
    pub name: String,
    pub question: String,
    pub min_consecutive: u32,
}

impl AlertRule {
    /// A rule as a request gives it; `index` is its place in the request's list, for errors.
    pub fn parse(
        index: usize,
        name: &str,
        question: &str,
        min_consecutive: Option<u32>,
        max_question_bytes: usize,
    ) -> Result<Self, Invalid> {
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !name_ok {
            return Err(Invalid::new(
                "alerts",
                format!("alerts[{index}].name must be 1-{MAX_NAME_LEN} characters of letters, digits, '.', '_' or '-'"),
            ));
        }
        if question.trim().is_empty() {
            return Err(Invalid::new(
                "alerts",
                format!("alerts[{index}].question must not be empty"),
            ));
        }
        if question.len() > max_question_bytes || question.contains('\0') {
            return Err(Invalid::new(
                "alerts",
                format!(
                    "alerts[{index}].question must be at most {max_question_bytes} bytes, without NUL characters"
                ),
            ));
        }
        let min_consecutive = min_consecutive.unwrap_or(DEFAULT_MIN_CONSECUTIVE);
        if !(1..=MAX_MIN_CONSECUTIVE).contains(&min_consecutive) {
            return Err(Invalid::new(
                "alerts",
                format!("alerts[{index}].min_consecutive must be from 1 to {MAX_MIN_CONSECUTIVE}"),
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            question: question.trim().to_owned(),
            min_consecutive,
        })
    }

    /// The text the model is asked for this rule.
    pub fn prompt(&self) -> String {
        format!("{}\nAnswer with one word: yes or no.", self.question)
    }
}

/// Checks a whole rule set: at most `max_alerts`, names unique.
pub fn check_set(rules: &[AlertRule], max_alerts: usize) -> Result<(), Invalid> {
    if rules.len() > max_alerts {
        return Err(Invalid::new(
            "alerts",
            format!(
                "{} alerts given; the limit is MAX_ALERTS={max_alerts}",
                rules.len()
            ),
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        if rules[..i].iter().any(|r| r.name == rule.name) {
            return Err(Invalid::new(
                "alerts",
                format!("alerts[{i}].name {:?} is used twice", rule.name),
            ));
        }
    }
    Ok(())
}

/// What an answer to a yes/no question says. Only a clear yes counts as yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Yes,
    No,
    /// Neither a clear yes nor a clear no: counted and shown, never taken as either.
    Unparseable,
    /// The model call failed (the frame's answer says why).
    Failed,
}

impl Verdict {
    /// Reads an answer strictly: `yes` or `no` (any case), alone or opening a sentence
    /// (`Yes.`, `No, the gate is empty`); anything else (`maybe`, `No idea`, `yes and no`,
    /// an empty answer) is [`Verdict::Unparseable`].
    pub fn read(answer: &str) -> Self {
        let text = answer
            .trim()
            .trim_start_matches(['"', '\'', '*', '`'])
            .to_lowercase();
        let end = text
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(text.len());
        let (word, rest) = text.split_at(end);
        let verdict = match word {
            "yes" => Verdict::Yes,
            "no" => Verdict::No,
            _ => return Verdict::Unparseable,
        };
        let closes = rest.chars().next().is_none_or(|c| {
            matches!(
                c,
                '.' | ',' | '!' | ';' | ':' | '"' | '\'' | '*' | '`' | '\n'
            )
        });
        if closes {
            verdict
        } else {
            Verdict::Unparseable
        }
    }
}

/// One alert's answer for one frame, as it is stored with the frame's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertAnswer {
    /// The alert's name.
    pub name: String,
    /// The version of the alert set the question came from.
    pub version: i64,
    pub answer: Verdict,
    /// The model's words when they were neither yes nor no, or why the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

impl AlertAnswer {
    /// The stored form of the model's reply (or failure) to `rule`'s question.
    pub fn from_reply(rule: &AlertRule, version: i64, reply: &Result<String, String>) -> Self {
        let (answer, raw) = match reply {
            Ok(text) => match Verdict::read(text) {
                Verdict::Unparseable => (Verdict::Unparseable, Some(clip(text))),
                v => (v, None),
            },
            Err(why) => (Verdict::Failed, Some(clip(why))),
        };
        Self {
            name: rule.name.clone(),
            version,
            answer,
            raw,
        }
    }
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_RAW_CHARS).collect()
}

/// Whether an alert turned on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Started,
    Ended,
}

impl Change {
    /// The event's type, as the event log, webhooks and SSE name it.
    pub fn event_type(self) -> &'static str {
        match self {
            Change::Started => "alert.started",
            Change::Ended => "alert.ended",
        }
    }
}

/// A change of an alert's state, and the answers behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    #[serde(skip)]
    pub change: Change,
    pub alert: String,
    /// The version of the alert set whose answers made the change.
    pub alert_version: i64,
    pub question: String,
    /// The media time of the first and the last answer of the run that made the change.
    pub from_pts_ms: i64,
    pub to_pts_ms: i64,
    /// The results whose answers made the change (the run, in order).
    pub seqs: Vec<i64>,
    /// For `alert.ended`: when the episode it ends began (the first yes that started it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_pts_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Mark {
    seq: i64,
    pts_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct AlertState {
    on: bool,
    /// Answers in a row that contradict `on`: the run that may change it.
    #[serde(default)]
    run: Vec<Mark>,
    /// While on: where the episode began.
    #[serde(default)]
    since_pts_ms: Option<i64>,
}

/// The state of one job's alerts: on or off, and the run of contradicting answers so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertTracker {
    alerts: BTreeMap<String, AlertState>,
}

impl AlertTracker {
    /// Applies the answers of one stored result (`seq`, at `pts_ms`), asked from `rules`: the
    /// events they fire. Unparseable and failed answers change nothing (not even a run).
    /// Alerts no longer in `rules` are forgotten without an event.
    pub fn apply(
        &mut self,
        seq: i64,
        pts_ms: i64,
        rules: &[AlertRule],
        answers: &[AlertAnswer],
    ) -> Vec<AlertEvent> {
        self.alerts
            .retain(|name, _| rules.iter().any(|r| &r.name == name));
        let mut events = Vec::new();
        for answer in answers {
            let Some(rule) = rules.iter().find(|r| r.name == answer.name) else {
                continue;
            };
            let yes = match answer.answer {
                Verdict::Yes => true,
                Verdict::No => false,
                Verdict::Unparseable | Verdict::Failed => continue,
            };
            let state = self.alerts.entry(rule.name.clone()).or_default();
            if yes == state.on {
                state.run.clear();
                continue;
            }
            state.run.push(Mark { seq, pts_ms });
            if state.run.len() < rule.min_consecutive as usize {
                continue;
            }
            let run = std::mem::take(&mut state.run);
            let first = run[0].pts_ms;
            state.on = yes;
            let started_pts_ms = if yes {
                state.since_pts_ms = Some(first);
                None
            } else {
                state.since_pts_ms.take()
            };
            events.push(AlertEvent {
                change: if yes { Change::Started } else { Change::Ended },
                alert: rule.name.clone(),
                alert_version: answer.version,
                question: rule.question.clone(),
                from_pts_ms: first,
                to_pts_ms: pts_ms,
                seqs: run.iter().map(|m| m.seq).collect(),
                started_pts_ms,
            });
        }
        events
    }

    /// Whether `name` is on now.
    pub fn is_on(&self, name: &str) -> bool {
        self.alerts.get(name).is_some_and(|s| s.on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, min: u32) -> AlertRule {
        AlertRule::parse(0, name, "is it bright?", Some(min), 100).unwrap()
    }

    fn answer(name: &str, version: i64, v: Verdict) -> AlertAnswer {
        AlertAnswer {
            name: name.into(),
            version,
            answer: v,
            raw: None,
        }
    }

    #[test]
    fn verdicts_are_read_strictly() {
        for yes in [
            "yes",
            "Yes",
            "YES.",
            " yes\n",
            "Yes, a person is there",
            "\"yes\"",
            "**Yes**",
            "yes!",
        ] {
            assert_eq!(Verdict::read(yes), Verdict::Yes, "{yes:?}");
        }
        for no in ["no", "No.", "NO", "No, the gate is empty", "no\n"] {
            assert_eq!(Verdict::read(no), Verdict::No, "{no:?}");
        }
        for odd in [
            "",
            "maybe",
            "No idea",
            "yes and no",
            "yesterday",
            "nobody",
            "I think yes",
            "y",
            "n/a",
            "Noo",
        ] {
            assert_eq!(Verdict::read(odd), Verdict::Unparseable, "{odd:?}");
        }
    }

    #[test]
    fn rules_are_checked() {
        assert!(AlertRule::parse(0, "gate", "person?", None, 10).is_ok());
        assert_eq!(
            AlertRule::parse(0, "gate", "person?", None, 10)
                .unwrap()
                .min_consecutive,
            DEFAULT_MIN_CONSECUTIVE
        );
        let e = AlertRule::parse(3, "gate", "  ", None, 10).unwrap_err();
        assert_eq!(e.param, "alerts");
        assert!(e.message.contains("alerts[3].question"), "{e}");
        assert!(AlertRule::parse(0, "", "q", None, 10).is_err());
        assert!(AlertRule::parse(0, "a b", "q", None, 10).is_err());
        assert!(AlertRule::parse(0, "a", "q", Some(0), 10).is_err());
        assert!(AlertRule::parse(0, "a", "q", Some(101), 10).is_err());
        assert!(AlertRule::parse(0, "a", "a long question", None, 5).is_err());
        let two = vec![rule("a", 2), rule("a", 3)];
        assert!(check_set(&two, 8).unwrap_err().message.contains("twice"));
        assert!(check_set(&[rule("a", 2), rule("b", 2)], 1)
            .unwrap_err()
            .message
            .contains("MAX_ALERTS=1"));
    }

    /// Feeds one alert's verdicts (one frame every 500 ms) and returns its events as
    /// (change, from, to, seqs).
    fn run(min: u32, verdicts: &[Verdict]) -> Vec<(Change, i64, i64, Vec<i64>)> {
        let rules = vec![rule("bright", min)];
        let mut t = AlertTracker::default();
        let mut out = Vec::new();
        for (i, v) in verdicts.iter().enumerate() {
            let seq = i as i64;
            for e in t.apply(seq, seq * 500, &rules, &[answer("bright", 1, *v)]) {
                out.push((e.change, e.from_pts_ms, e.to_pts_ms, e.seqs));
            }
        }
        out
    }

    #[test]
    fn a_change_fires_once_after_min_consecutive_answers() {
        use Verdict::{No as N, Yes as Y};
        let events = run(2, &[N, N, Y, Y, Y, Y, N, N, N]);
        assert_eq!(
            events,
            vec![
                (Change::Started, 1000, 1500, vec![2, 3]),
                (Change::Ended, 3000, 3500, vec![6, 7]),
            ]
        );
    }

    #[test]
    fn a_single_odd_answer_fires_nothing() {
        use Verdict::{No as N, Yes as Y};
        assert!(run(2, &[N, Y, N, N, Y, N]).is_empty());
        // Once on, a single no does not end it.
        let events = run(2, &[Y, Y, N, Y, Y, N, Y]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, Change::Started);
        // min_consecutive 1 follows every answer.
        assert_eq!(run(1, &[Y, N, Y]).len(), 3);
    }

    #[test]
    fn unparseable_answers_count_for_nothing() {
        use Verdict::{Failed as F, No as N, Unparseable as U, Yes as Y};
        assert!(run(2, &[U, U, U, U]).is_empty());
        // An unparseable answer neither breaks nor extends a run.
        let events = run(2, &[Y, U, Y]);
        assert_eq!(events, vec![(Change::Started, 0, 1000, vec![0, 2])]);
        assert_eq!(run(3, &[Y, F, Y, N]), vec![]);
    }

    #[test]
    fn ended_names_when_the_episode_began_and_state_survives_a_round_trip() {
        use Verdict::{No as N, Yes as Y};
        let rules = vec![rule("bright", 2)];
        let mut t = AlertTracker::default();
        for (seq, v) in [Y, Y, N].iter().enumerate() {
            t.apply(
                seq as i64,
                seq as i64 * 500,
                &rules,
                &[answer("bright", 1, *v)],
            );
        }
        // Saved with the result and read back by a resumed job.
        let text = serde_json::to_string(&t).unwrap();
        let mut resumed: AlertTracker = serde_json::from_str(&text).unwrap();
        assert_eq!(resumed, t);
        assert!(resumed.is_on("bright"));
        let events = resumed.apply(3, 1500, &rules, &[answer("bright", 2, N)]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].change, Change::Ended);
        assert_eq!(events[0].seqs, vec![2, 3]);
        assert_eq!(events[0].started_pts_ms, Some(0));
        assert_eq!(
            events[0].alert_version, 2,
            "the version whose answer made the change"
        );
    }

    #[test]
    fn a_removed_alert_is_forgotten() {
        use Verdict::Yes as Y;
        let mut t = AlertTracker::default();
        let rules = vec![rule("a", 2)];
        t.apply(0, 0, &rules, &[answer("a", 1, Y)]);
        t.apply(1, 500, &rules, &[answer("a", 1, Y)]);
        assert!(t.is_on("a"));
        assert!(t.apply(2, 1000, &[], &[]).is_empty());
        assert!(!t.is_on("a"));
    }

    #[test]
    fn replies_become_stored_answers() {
        let r = rule("a", 2);
        let yes = AlertAnswer::from_reply(&r, 4, &Ok("Yes.".into()));
        assert_eq!((yes.answer, yes.raw, yes.version), (Verdict::Yes, None, 4));
        let odd = AlertAnswer::from_reply(&r, 4, &Ok("it might be".into()));
        assert_eq!(odd.answer, Verdict::Unparseable);
        assert_eq!(odd.raw.as_deref(), Some("it might be"));
        let failed = AlertAnswer::from_reply(&r, 4, &Err("timeout".into()));
        assert_eq!(failed.answer, Verdict::Failed);
    }
}
