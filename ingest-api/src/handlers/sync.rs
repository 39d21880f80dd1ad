//! Catch-up for a client that was away: every record of its user that changed since its
//! cursor (`shared::store::sync`), a page at a time, and the cursor to come back with.
//!
//! A cursor is the store's position in the user's feed, bound to the user (a digest of the
//! user id goes with it) and base64url-encoded: opaque, and refused for another user.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::store::{token, Change};
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;
use crate::extract::{AppJson, AppQuery, Caller};
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SyncQuery {
    /// The `cursor` of the last sync; absent: everything, from the beginning.
    pub since: Option<String>,
    /// Changes per page, 1 to 500; 100 when absent.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
}

/// A page of changes, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SyncPage {
    /// Each changed record once, as it is now (a deletion as a tombstone).
    pub changes: Vec<Change>,
    /// Where to sync from next time (or for the next page). The last changes, a few seconds
    /// old or younger, may come again: apply changes by id.
    pub cursor: String,
    /// More changes wait: call again with `cursor` at once.
    pub has_more: bool,
}

/// The part of a cursor that names its user.
fn owner_tag(user_id: &str) -> String {
    let digest = Sha256::digest(format!("characterbot sync cursor\n{user_id}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn bad_cursor() -> ApiError {
    ApiError::bad_request(
        "invalid_cursor",
        "since is not a cursor this API gave you; sync from the beginning without it",
    )
}

/// The store position a cursor holds (`None`: the beginning).
fn position_of(cursor: &str, user_id: &str) -> Result<Option<String>, ApiError> {
    let raw = token::decode(cursor).ok_or_else(bad_cursor)?;
    let (tag, position) = raw.split_once('.').ok_or_else(bad_cursor)?;
    if tag != owner_tag(user_id) {
        return Err(bad_cursor());
    }
    Ok((!position.is_empty()).then(|| position.to_owned()))
}

fn cursor_of(position: Option<&str>, user_id: &str) -> String {
    token::encode(&format!(
        "{}.{}",
        owner_tag(user_id),
        position.unwrap_or("")
    ))
}

#[utoipa::path(get, path = "/v1/sync", tag = "sync", params(SyncQuery),
    responses((status = 200, body = SyncPage, description = "The records changed since the cursor"),
        (status = 400, description = "`invalid_cursor`, `invalid_limit`"),
        (status = 410, description = "`cursor_expired`: on AWS, a cursor given out more than the 30 days \
            deletions are kept; sync again without `since` and replace what you hold")),
    security(("bearer" = [])))]
pub async fn sync(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(q): AppQuery<SyncQuery>,
) -> Result<AppJson<SyncPage>, ApiError> {
    let limit = match q.limit {
        None => 100,
        Some(n @ 1..=500) => n,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_limit",
                "limit must be 1 to 500",
            ))
        }
    };
    let since = q
        .since
        .as_deref()
        .map(|c| position_of(c, caller.id()))
        .transpose()?
        .flatten();
    let page = state
        .ports
        .store
        .changes(caller.id(), since.as_deref(), limit)
        .await
        .map_err(|e| match e {
            shared::Error::Invalid(_) => bad_cursor(),
            e => e.into(),
        })?;
    let position = page.position.or(since);
    Ok(AppJson(SyncPage {
        changes: page.changes,
        cursor: cursor_of(position.as_deref(), caller.id()),
        has_more: page.has_more,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_opaque_and_its_users_alone() {
        let cursor = cursor_of(Some("42"), "alice");
        assert!(!cursor.contains("42") && !cursor.contains("alice"));
        assert_eq!(
            position_of(&cursor, "alice").unwrap().as_deref(),
            Some("42")
        );
        assert!(position_of(&cursor, "bob").is_err());
        assert_eq!(position_of(&cursor_of(None, "bob"), "bob").unwrap(), None);
        assert!(position_of("not a cursor", "alice").is_err());
    }
}
