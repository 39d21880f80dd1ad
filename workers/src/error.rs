//! The crate's one error type. Job failures are `shared::Error`s (they carry the
//! transient/permanent split); this names what only a consumer can get wrong.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The parse error is the source: a [`shared::error::Report`] of this is the reason
    /// stored on the dead letter, `queue message is not a job: <parse error>`.
    #[error("queue message is not a job")]
    BadMessage(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use shared::error::Report;

    use super::*;

    #[test]
    fn the_dead_letter_reason_names_the_parse_error_and_keeps_it_as_the_source() {
        let parse = serde_json::from_str::<serde_json::Value>("poison").expect_err("not JSON");
        let e = Error::BadMessage(parse);
        assert_eq!(
            Report(&e).to_string(),
            "queue message is not a job: expected value at line 1 column 1"
        );
        assert!(std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<serde_json::Error>())
            .is_some());
    }
}
