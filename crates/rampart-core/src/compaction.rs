//! How far the Raft log may be cut. Raft itself needs nothing below its last snapshot, but
//! other readers of the committed log do: the backup archiver now, region links next. Each
//! registers the next index it needs (its floor); compaction keeps everything from the
//! lowest floor on, as long as that keeps at most `max_retained_bytes` more than Raft
//! needs. Past that bound the log is cut where Raft asked, and the readers whose entries
//! went are overtaken: they must start again from a snapshot (a backup, for the archiver).

/// One reader of the committed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    pub name: String,
    /// The next log index it needs.
    pub next_index: u64,
}

/// Where to cut the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Remove every entry up to this index (inclusive; 0 = none).
    pub upto_index: u64,
    /// Readers that had not read entries this cut removes.
    pub overtaken: Vec<String>,
}

/// The lowest index any reader still needs, if any reader needs one at or below
/// `requested_upto_index`.
pub fn floor(requested_upto_index: u64, readers: &[Reader]) -> Option<u64> {
    readers
        .iter()
        .map(|r| r.next_index)
        .min()
        .filter(|floor| *floor <= requested_upto_index)
}

/// The cut for Raft's request to purge up to `requested_upto_index`, when keeping the
/// readers' entries (from [`floor`] to the request) would retain `retained_bytes`.
pub fn cut(requested_upto_index: u64, readers: &[Reader], retained_bytes: u64, max_retained_bytes: u64) -> Cut {
    let Some(floor) = floor(requested_upto_index, readers) else {
        return Cut {
            upto_index: requested_upto_index,
            overtaken: Vec::new(),
        };
    };
    if retained_bytes <= max_retained_bytes {
        return Cut {
            upto_index: floor.saturating_sub(1),
            overtaken: Vec::new(),
        };
    }
    Cut {
        upto_index: requested_upto_index,
        overtaken: readers
            .iter()
            .filter(|r| r.next_index <= requested_upto_index)
            .map(|r| r.name.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(name: &str, next_index: u64) -> Reader {
        Reader {
            name: name.into(),
            next_index,
        }
    }

    #[test]
    fn without_readers_or_with_readers_ahead_the_log_is_cut_where_raft_asked() {
        assert_eq!(cut(500, &[], 0, 0).upto_index, 500);
        let ahead = [reader("archiver", 501)];
        assert_eq!(
            cut(500, &ahead, 0, 0),
            Cut {
                upto_index: 500,
                overtaken: vec![]
            }
        );
    }

    #[test]
    fn the_lowest_reader_keeps_what_it_has_not_read_within_the_bound() {
        let readers = [reader("archiver", 120), reader("link-us-west-2", 300)];
        assert_eq!(floor(500, &readers), Some(120));
        assert_eq!(
            cut(500, &readers, 1 << 20, 1 << 30),
            Cut {
                upto_index: 119,
                overtaken: vec![]
            }
        );
        assert_eq!(
            cut(500, &[reader("archiver", 1)], 10, 10).upto_index,
            0,
            "keeps the whole log"
        );
    }

    #[test]
    fn past_the_bound_the_log_is_cut_and_the_readers_behind_are_overtaken() {
        let readers = [reader("archiver", 120), reader("link-us-west-2", 600)];
        assert_eq!(
            cut(500, &readers, (1 << 30) + 1, 1 << 30),
            Cut {
                upto_index: 500,
                overtaken: vec!["archiver".into()]
            }
        );
    }
}
