//! Requests and batches on DynamoDB. A request is an item of its own (`REQ#{id}`) with a
//! version: a transition writes only over the version it read (optimistic concurrency), so
//! racing workers cannot move a state backwards.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};

use super::{
    body, get_n, get_s, is_conditional_failure, key, mark_changed, n, s, storage, user_pk,
    DynamoStore, Item,
};
use crate::domain::{Batch, Page, RequestRecord};
use crate::ids::{BatchId, RequestId};
use crate::store::{RequestStore, Transition};
use crate::time::now_secs;
use crate::{Error, Result};

/// How long finished requests are kept before DynamoDB's TTL removes them.
const FINISHED_REQUEST_TTL_SECS: i64 = 30 * 86_400;

impl DynamoStore {
    /// A batch's item counted from its requests as they are now (see [`Batch::counted`]).
    async fn counted(&self, item: &Item) -> Result<Batch> {
        let mut batch: Batch = body(item)?;
        batch.cancelled_at = get_s(item, "cancelled_at").map(str::to_owned);
        let mut batch = batch.recount();
        let mut last: Option<String> = None;
        for chunk in batch.request_ids.clone().chunks(100) {
            let keys = chunk
                .iter()
                .map(|id| key(format!("REQ#{id}"), "REQ"))
                .collect();
            for item in self.batch_get(keys).await? {
                let record: RequestRecord = body(&item)?;
                batch.count(Some(record.status), 1);
                last = last.max(Some(record.updated_at));
            }
        }
        Ok(batch.counted(last))
    }

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
        match self
            .get(&user_pk(user_id), &format!("BATCH#{batch_id}"))
            .await?
        {
            Some(item) => self.counted(&item).await.map(Some),
            None => Ok(None),
        }
    }

    async fn list_batches(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Batch>> {
        let page = self
            .page_items(&user_pk(user_id), "BATCH#", false, limit, next_token)
            .await?;
        let mut items = Vec::with_capacity(page.items.len());
        for item in &page.items {
            items.push(self.counted(item).await?);
        }
        Ok(Page {
            items,
            next_token: page.next_token,
        })
    }

    async fn batch_requests(
        &self,
        user_id: &str,
        request_ids: &[RequestId],
    ) -> Result<Vec<RequestRecord>> {
        let mut found: HashMap<String, RequestRecord> = HashMap::new();
        for chunk in request_ids.chunks(100) {
            let mut keys: Vec<Item> = chunk
                .iter()
                .map(|id| key(format!("REQ#{id}"), "REQ"))
                .collect();
            keys.dedup();
            for item in self.batch_get(keys).await? {
                if get_s(&item, "user_id") == Some(user_id) {
                    let record: RequestRecord = body(&item)?;
                    found.insert(record.request_id.to_string(), record);
                }
            }
        }
        Ok(request_ids
            .iter()
            .filter_map(|id| found.remove(id.as_str()))
            .collect())
    }

    async fn mark_batch_cancelled(&self, user_id: &str, batch_id: &BatchId) -> Result<bool> {
        let written = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), format!("BATCH#{batch_id}"))))
            // The first cancel's time is kept: a repeated cancel changes nothing.
            .update_expression("SET cancelled_at = if_not_exists(cancelled_at, :at)")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":at", s(crate::time::now_rfc3339()))
            .send()
            .await;
        match written {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(storage("cancel a batch", e)),
        }
    }
}
