//! Requests and batches on DynamoDB. A request is an item of its own (`REQ#{id}`) with a
//! version: a transition writes only over the version it read (optimistic concurrency), so
//! racing workers cannot move a state backwards.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{KeysAndAttributes, PutRequest, WriteRequest};

use super::{
    body, get_n, get_s, is_conditional_failure, key, mark_changed, n, s, storage, user_pk,
    DynamoStore, Item,
};
use crate::domain::{Batch, RequestRecord, RequestStatus};
use crate::ids::{BatchId, RequestId};
use crate::store::{RequestStore, Transition};
use crate::time::now_secs;
use crate::{Error, Result};

/// How long finished requests are kept before DynamoDB's TTL removes them.
const FINISHED_REQUEST_TTL_SECS: i64 = 30 * 86_400;

impl DynamoStore {
    /// A request's item, as every write of a request puts it whole: marked as a change of its
    /// owner's, now (build it again for each try of a write).
    pub(crate) fn request_item(user_id: &str, r: &RequestRecord, version: i64) -> Result<Item> {
        let mut item = key(format!("REQ#{}", r.request_id), "REQ");
        item.insert("user_id".into(), s(user_id));
        item.insert("status".into(), s(r.status.as_str()));
        item.insert("version".into(), n(version));
        item.insert("body".into(), s(serde_json::to_string(r)?));
        mark_changed(&mut item, user_id);
        if r.status.is_final() {
            item.insert(
                "expires_at".into(),
                n(now_secs() + FINISHED_REQUEST_TTL_SECS),
            );
        }
        Ok(item)
    }
}

#[async_trait]
impl RequestStore for DynamoStore {
    async fn create_requests(
        &self,
        user_id: &str,
        requests: &[RequestRecord],
        batch: Option<&Batch>,
    ) -> Result<()> {
        // Requests first, then the batch that names them: a crash in between leaves requests no
        // queue message points to and no client was told of (no 202 was sent).
        for chunk in requests.chunks(25) {
            let writes = chunk
                .iter()
                .map(|r| {
                    Ok(WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(Self::request_item(user_id, r, 1)?))
                                .build()
                                .map_err(|e| storage("build a request write", e))?,
                        )
                        .build())
                })
                .collect::<Result<Vec<_>>>()?;
            self.batch_write(writes).await?;
        }
        if let Some(b) = batch {
            let mut item = key(user_pk(user_id), format!("BATCH#{}", b.batch_id));
            item.insert("body".into(), s(serde_json::to_string(b)?));
            self.put_new(item).await?;
        }
        Ok(())
    }

    async fn get_request(
        &self,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<Option<RequestRecord>> {
        match self.get(&format!("REQ#{request_id}"), "REQ").await? {
            Some(item) if get_s(&item, "user_id") == Some(user_id) => body(&item).map(Some),
            _ => Ok(None),
        }
    }

    async fn transition(
        &self,
        request_id: &RequestId,
        transition: Transition,
    ) -> Result<(RequestRecord, bool)> {
        // Optimistic concurrency: write only over the version read; on a lost race, read again.
        for _ in 0..10 {
            let item = self
                .get(&format!("REQ#{request_id}"), "REQ")
                .await?
                .ok_or(Error::NotFound)?;
            let (user, version) = (
                get_s(&item, "user_id").unwrap_or_default().to_owned(),
                get_n(&item, "version").unwrap_or(0),
            );
            let mut record: RequestRecord = body(&item)?;
            if !transition.clone().apply(&mut record) {
                return Ok((record, false));
            }
            let written = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(Self::request_item(&user, &record, version + 1)?))
                .condition_expression("version = :v")
                .expression_attribute_values(":v", n(version))
                .send()
                .await;
            match written {
                Ok(_) => return Ok((record, true)),
                Err(e) if is_conditional_failure(&e) => continue,
                Err(e) => return Err(storage("update request", e)),
            }
        }
        Err(Error::storage_msg("request kept changing under the update"))
    }

    async fn get_batch(&self, user_id: &str, batch_id: &BatchId) -> Result<Option<Batch>> {
        let Some(item) = self
            .get(&user_pk(user_id), &format!("BATCH#{batch_id}"))
            .await?
        else {
            return Ok(None);
        };
        let mut batch: Batch = body(&item)?;
        (batch.succeeded, batch.failed, batch.pending) = (0, 0, 0);
        let ids = std::mem::take(&mut batch.request_ids);
        for chunk in ids.chunks(100) {
            let mut keys: Vec<Item> = chunk
                .iter()
                .map(|id| key(format!("REQ#{id}"), "REQ"))
                .collect();
            while !keys.is_empty() {
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(
                        &self.table,
                        KeysAndAttributes::builder()
                            .set_keys(Some(keys))
                            .projection_expression("#s")
                            .expression_attribute_names("#s", "status")
                            .consistent_read(true)
                            .build()
                            .map_err(|e| storage("build a batch read", e))?,
                    )
                    .send()
                    .await
                    .map_err(|e| storage("read batch", e))?;
                for item in out
                    .responses
                    .and_then(|mut r| r.remove(&self.table))
                    .unwrap_or_default()
                {
                    batch.count(get_s(&item, "status").and_then(RequestStatus::parse), 1);
                }
                keys = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.table))
                    .map(|k| k.keys)
                    .unwrap_or_default();
            }
        }
        batch.request_ids = ids;
        Ok(Some(batch))
    }
}
