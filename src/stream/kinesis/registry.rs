//! The shard registry: which partition each shard is, kept under the storage root, one generation after another.

use super::*;

/// One registered shard; its partition is its index in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub shard: String,
    /// The shard(s) it was split or merged from.
    #[serde(default)]
    pub parents: Vec<String>,
    /// The sequence number its records start at.
    pub first_sequence: String,
    /// A partition of a stream this root no longer reads (deleted and
    /// created again, or replaced: `accept-loss --stream`): final at its
    /// archived end, never polled; its shard id may be registered again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

/// Which partition each shard is: a list only ever appended to, one object
/// per generation, each created only if absent — so every node that reads
/// the latest generation sees the same numbering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub stream: String,
    pub generation: u64,
    pub shards: Vec<ShardEntry>,
}

pub(super) fn registry_dir(stream: &str) -> String {
    format!("stream/kinesis/{stream}")
}

/// The object of a registry generation, under the storage root.
pub(crate) fn registry_object(stream: &str, generation: u64) -> String {
    format!("{}/shards-{generation:08}.json", registry_dir(stream))
}

impl Registry {
    /// The latest generation under `storage`, if any.
    pub async fn load(storage: &Storage, stream: &str) -> Result<Option<Registry>, KinesisError> {
        let fail = |op, detail: String| KinesisError::Registry {
            stream: stream.into(),
            op,
            detail,
        };
        let dir = registry_dir(stream);
        let latest = storage
            .list_files(&dir)
            .await
            .map_err(|e| fail("listed", e.to_string()))?
            .into_iter()
            .filter_map(|f| {
                f.strip_prefix("shards-")?
                    .strip_suffix(".json")?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        let Some(g) = latest else { return Ok(None) };
        let bytes = storage
            .get(&format!("{dir}/shards-{g:08}.json"))
            .await
            .map_err(|e| fail("read", e.to_string()))?
            .ok_or_else(|| fail("read", format!("generation {g} vanished")))?;
        let r: Registry =
            serde_json::from_slice(&bytes).map_err(|e| fail("read", e.to_string()))?;
        Ok(Some(r))
    }

    /// Registers the shards of `listed` not registered yet (parents before
    /// their children), racing other nodes fairly: a generation lost to
    /// another writer is read back and the rest added after it.
    pub async fn extend(
        storage: &Storage,
        stream: &str,
        listed: &[ShardEntry],
    ) -> Result<Registry, KinesisError> {
        loop {
            let current = Registry::load(storage, stream).await?.unwrap_or(Registry {
                stream: stream.into(),
                generation: 0,
                shards: Vec::new(),
            });
            let mut missing: Vec<&ShardEntry> = listed
                .iter()
                .filter(|s| {
                    !current
                        .shards
                        .iter()
                        .any(|c| !c.retired && c.shard == s.shard)
                })
                .collect();
            if missing.is_empty() && current.generation > 0 {
                return Ok(current);
            }
            // Shard ids grow with creation, so a parent sorts before its child.
            missing.sort_by(|a, b| (a.shard.len(), &a.shard).cmp(&(b.shard.len(), &b.shard)));
            let mut next = current.clone();
            next.generation += 1;
            next.shards.extend(missing.into_iter().cloned());
            let body = serde_json::to_vec_pretty(&next).expect("a registry serializes");
            let name = format!(
                "{}/shards-{:08}.json",
                registry_dir(stream),
                next.generation
            );
            match storage.create(&name, Bytes::from(body)).await {
                Ok(true) => return Ok(next),
                Ok(false) => continue, // another node was first: build on its list
                Err(e) => {
                    return Err(KinesisError::Registry {
                        stream: stream.into(),
                        op: "written",
                        detail: e.to_string(),
                    });
                }
            }
        }
    }
}

/// Every shard of the stream, open and closed (within retention).
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<ShardEntry>, KinesisError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let resp = req.send().await.map_err(|e| {
            if e.as_service_error().and_then(|s| s.code()) == Some("ResourceNotFoundException") {
                KinesisError::NoStream {
                    stream: stream.into(),
                }
            } else {
                KinesisError::Connect {
                    stream: stream.into(),
                    detail: aws_detail(e),
                }
            }
        })?;
        for s in resp.shards() {
            out.push(ShardEntry {
                shard: s.shard_id().to_string(),
                parents: s
                    .parent_shard_id()
                    .into_iter()
                    .chain(s.adjacent_parent_shard_id())
                    .map(str::to_string)
                    .collect(),
                first_sequence: s
                    .sequence_number_range()
                    .map(|r| r.starting_sequence_number().to_string())
                    .unwrap_or_default(),
                retired: false,
            });
        }
        match resp.next_token() {
            Some(t) => token = Some(t.to_string()),
            None => return Ok(out),
        }
    }
}

/// The registry of `config.stream` after registering every shard listed
/// now: what a node's partition count is at startup.
pub async fn resolve(storage: &Storage, config: &KinesisConfig) -> Result<Registry, KinesisError> {
    let client = config.client().await;
    let listed = list_shards(&client, &config.stream).await?;
    Registry::extend(storage, &config.stream, &listed).await
}

// ---------------------------------------------------------------------------
// The source
