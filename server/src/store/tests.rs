//! Unit tests of the embedded log: seq assignment, durability across reopen,
//! group commit under concurrency, edits, tombstones and trimming.

use std::sync::{Arc, Mutex};

use super::*;
use crate::model::{ChannelId, NewPost};

fn ch(s: &str) -> ChannelId {
    ChannelId::parse(s).unwrap()
}

fn post(t: &str) -> NewPost {
    NewPost::new(t.to_string(), vec![]).unwrap()
}

fn recording_sink() -> (EventSink, Arc<Mutex<Vec<LogEvent>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        Arc::new(move |ev: &[LogEvent]| s.lock().unwrap().extend_from_slice(ev)),
        seen,
    )
}

#[tokio::test]
async fn seqs_are_gapless_across_concurrent_appends_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, seen) = recording_sink();
    let log = RedbLog::open(dir.path(), sink).unwrap();
    log.create_channel(ch("a"), "A".into()).await.unwrap();
    assert!(matches!(
        log.create_channel(ch("a"), "A".into()).await,
        Err(StoreError::ChannelExists(_))
    ));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..50 {
                seqs.push(
                    log.append(ch("a"), post(&format!("{w}-{i}")), None)
                        .await
                        .unwrap()
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=800).collect::<Vec<_>>());
    // The sink saw every post once, in seq order.
    let seqs: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            LogEvent::Posted(p) => p.seq,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(seqs, (1..=800).collect::<Vec<_>>());
    // Once closed, the file opens again at once.
    log.close().await.unwrap();
    assert!(matches!(
        log.append(ch("a"), post("late"), None).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        log.read(ch("a"), 0, 1).await,
        Err(StoreError::Closed)
    ));
    let (sink, _) = recording_sink();
    let log = RedbLog::open(dir.path(), sink).unwrap();
    assert_eq!(log.channel(&ch("a")).unwrap().head_seq, 800);
    let posts = log.read(ch("a"), 795, 100).await.unwrap();
    assert_eq!(
        posts.iter().map(|p| p.seq).collect::<Vec<_>>(),
        vec![796, 797, 798, 799, 800]
    );
    assert_eq!(
        log.append(ch("a"), post("next"), None).await.unwrap().seq,
        801
    );
}

#[tokio::test]
async fn unknown_channel_edit_delete_and_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, seen) = recording_sink();
    let log = RedbLog::open(dir.path(), sink).unwrap();
    assert!(matches!(
        log.append(ch("nope"), post("x"), None).await,
        Err(StoreError::UnknownChannel(_))
    ));
    log.create_channel(ch("c"), String::new()).await.unwrap();
    for i in 0..3 {
        log.append(ch("c"), post(&format!("p{i}")), None)
            .await
            .unwrap();
    }
    let e = log.edit(ch("c"), 2, "edited".into()).await.unwrap();
    assert_eq!(e.text, "edited");
    assert!(e.edited_at_ms > 0);
    let d = log.delete(ch("c"), 1).await.unwrap();
    assert!(d.deleted && d.text.is_empty());
    assert!(matches!(
        log.edit(ch("c"), 1, "again".into()).await,
        Err(StoreError::PostNotFound { .. })
    ));
    assert!(matches!(
        log.delete(ch("c"), 9).await,
        Err(StoreError::PostNotFound { .. })
    ));
    let all = log.read(ch("c"), 0, 10).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all[0].deleted);
    assert_eq!(all[1].text, "edited");
    assert_eq!(all[2].text, "p2");
    // A new post after edits still takes the next seq.
    assert_eq!(log.append(ch("c"), post("p3"), None).await.unwrap().seq, 4);
    let kinds: Vec<&str> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            LogEvent::Posted(_) => "post",
            LogEvent::Edited(_) => "edit",
            LogEvent::Deleted(_) => "delete",
        })
        .collect();
    assert_eq!(kinds, ["post", "post", "post", "edit", "delete", "post"]);
}

#[tokio::test]
async fn trim_by_count_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, _) = recording_sink();
    let log = RedbLog::open(dir.path(), sink).unwrap();
    log.create_channel(ch("t"), String::new()).await.unwrap();
    for i in 0..10 {
        log.append(ch("t"), post(&format!("{i}")), None)
            .await
            .unwrap();
    }
    let n = log
        .trim(
            ch("t"),
            TrimPolicy {
                older_than_ms: 0,
                keep_max: 4,
            },
        )
        .await
        .unwrap();
    assert_eq!(n, 6);
    let info = log.channel(&ch("t")).unwrap();
    assert_eq!((info.oldest_seq, info.head_seq), (7, 10));
    assert_eq!(log.read(ch("t"), 0, 100).await.unwrap()[0].seq, 7);
    let n = log
        .trim(
            ch("t"),
            TrimPolicy {
                older_than_ms: i64::MAX,
                keep_max: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(n, 4);
    let info = log.channel(&ch("t")).unwrap();
    assert_eq!((info.oldest_seq, info.head_seq), (11, 10));
    assert_eq!(
        log.append(ch("t"), post("after"), None).await.unwrap().seq,
        11
    );
}

#[tokio::test]
async fn idempotent_append_answers_the_first_post_also_in_one_batch_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, seen) = recording_sink();
    let log = RedbLog::open(dir.path(), sink).unwrap();
    log.create_channel(ch("i"), String::new()).await.unwrap();
    let key = || Some("k-1".to_string());
    // Many concurrent appends with one key: likely in one batch; one post.
    let mut tasks = Vec::new();
    for n in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(ch("i"), post(&format!("try {n}")), key())
                .await
                .unwrap()
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert!(answers.iter().all(|p| p.seq == 1 && p.id == answers[0].id));
    assert_eq!(log.channel(&ch("i")).unwrap().head_seq, 1);
    assert_eq!(seen.lock().unwrap().len(), 1);
    // Another key, and no key, post anew.
    let other = log
        .append(ch("i"), post("b"), Some("k-2".into()))
        .await
        .unwrap();
    assert_eq!(other.seq, 2);
    assert_eq!(log.append(ch("i"), post("c"), None).await.unwrap().seq, 3);
    // The same key on another channel is another key.
    log.create_channel(ch("j"), String::new()).await.unwrap();
    assert_eq!(log.append(ch("j"), post("x"), key()).await.unwrap().seq, 1);
    log.close().await.unwrap();

    let (sink, _) = recording_sink();
    let log = RedbLog::open(dir.path(), sink).unwrap();
    let again = log.append(ch("i"), post("retry"), key()).await.unwrap();
    assert_eq!((again.seq, again.id.as_str()), (1, answers[0].id.as_str()));
    assert_eq!(log.channel(&ch("i")).unwrap().head_seq, 3);
    // A trim keeps records younger than the TTL.
    log.trim(
        ch("i"),
        TrimPolicy {
            older_than_ms: 0,
            keep_max: 0,
        },
    )
    .await
    .unwrap();
    assert_eq!(log.append(ch("i"), post("r"), key()).await.unwrap().seq, 1);
}
