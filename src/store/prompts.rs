//! Prompt versions: append-only history per scope (global or one job), and the prompt in
//! force for a job. A version may carry a `response_format` (JSON Schema text, checked by the
//! API before it gets here).

use std::future::Future;

use sqlx::Row;

use super::*;

impl Store {
    /// Appends the next version in `scope`; versions rise by one and are never rewritten.
    pub async fn append_prompt(
        &self,
        scope: &PromptScope,
        prompt: &str,
        response_format: Option<&str>,
    ) -> Result<PromptVersion, StoreError> {
        let key = scope.key();
        insert_next_version(|| {
            sqlx::query(
                "INSERT INTO prompt_versions (scope_key, version, prompt, response_format, created_at) \
                 SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, $4 FROM prompt_versions WHERE scope_key = $1",
            )
            .bind(&key)
            .bind(prompt)
            .bind(response_format)
            .bind(now_secs())
            .execute(&self.writer)
        })
        .await?;
        self.current_prompt(scope)
            .await?
            .ok_or_else(|| StoreError::Corrupt("prompt vanished after insert".into()))
    }

    /// The newest version in `scope`, if the scope has any.
    pub async fn current_prompt(
        &self,
        scope: &PromptScope,
    ) -> Result<Option<PromptVersion>, StoreError> {
        Ok(self.prompt_history(scope, 1).await?.0.into_iter().next())
    }

    /// Newest first, at most `limit`, and how many versions the scope holds.
    pub async fn prompt_history(
        &self,
        scope: &PromptScope,
        limit: i64,
    ) -> Result<(Vec<PromptVersion>, i64), StoreError> {
        let key = scope.key();
        let rows = sqlx::query(limited(
            "SELECT version, prompt, created_at, \
             (SELECT MIN(created_at) FROM prompt_versions p2 WHERE p2.scope_key = $1), response_format \
             FROM prompt_versions WHERE scope_key = $1 ORDER BY version DESC",
            limit,
        ))
        .bind(&key)
        .fetch_all(&self.pool)
        .await?;
        let total = self.count_versions("prompt_versions", &key).await?;
        let versions = rows
            .iter()
            .map(|r| {
                Ok(PromptVersion {
                    scope: scope.clone(),
                    version: r.try_get(0)?,
                    prompt: r.try_get(1)?,
                    created_at: r.try_get(2)?,
                    scope_created_at: r.try_get(3)?,
                    response_format: r.try_get(4)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((versions, total))
    }

    /// The prompt a job uses now: its own newest version, else the newest global one.
    pub async fn effective_prompt(
        &self,
        job_id: &JobId,
    ) -> Result<Option<PromptVersion>, StoreError> {
        let own = PromptScope::Job(job_id.clone()).key();
        let row = sqlx::query(concat!(
            "SELECT ",
            effective_prompt_columns!(),
            " FROM prompt_versions p WHERE (p.scope_key, p.version) = ",
            effective_prompt_key!("$1")
        ))
        .bind(&own)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => prompt_from_row(&r, job_id),
            None => Ok(None),
        }
    }

    /// A job and the prompt it uses now, in one query (what a status read needs).
    pub async fn job_with_prompt(
        &self,
        job_id: &JobId,
    ) -> Result<Option<(JobRecord, Option<PromptVersion>)>, StoreError> {
        let own = PromptScope::Job(job_id.clone()).key();
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            ", ",
            effective_prompt_columns!(),
            " FROM jobs LEFT JOIN prompt_versions p ON (p.scope_key, p.version) = ",
            effective_prompt_key!("$2"),
            " WHERE jobs.job_id = $1"
        ))
        .bind(job_id.as_str())
        .bind(&own)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some((job_from_row(&r)?, prompt_from_row(&r, job_id)?))),
            None => Ok(None),
        }
    }

    /// How many versions the scope `key` holds in `table` (`prompt_versions` or
    /// `alert_versions`).
    pub(super) async fn count_versions(
        &self,
        table: &'static str,
        key: &str,
    ) -> Result<i64, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE scope_key = $1");
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(key)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// Writes global version 1 from DEFAULT_PROMPT if the global scope is empty.
    pub async fn ensure_global_prompt(&self, default_prompt: &str) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO prompt_versions (scope_key, version, prompt, created_at) \
             SELECT 'global', 1, $1, $2 WHERE NOT EXISTS (SELECT 1 FROM prompt_versions WHERE scope_key = 'global')",
        )
        .bind(default_prompt)
        .bind(now_secs())
        .execute(&self.writer)
        .await;
        match inserted {
            Ok(_) => Ok(()),
            // Another replica wrote it first.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs an `INSERT … SELECT COALESCE(MAX(version), 0) + 1 …` of a versioned scope until it
/// takes a version: two writers may pick the same next version (PostgreSQL, concurrent
/// updates); the primary key refuses one, which tries again with the new maximum.
pub(super) async fn insert_next_version<F, Fut>(mut insert: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<sqlx::any::AnyQueryResult, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match insert().await {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 10 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The effective prompt's columns, read by [`prompt_from_row`] (the table aliased `p`).
macro_rules! effective_prompt_columns {
    () => {
        "p.scope_key AS p_scope, p.version AS p_version, p.prompt AS p_prompt, \
         p.created_at AS p_created_at, p.response_format AS p_response_format, \
         (SELECT MIN(created_at) FROM prompt_versions p2 WHERE p2.scope_key = p.scope_key) AS p_since"
    };
}
use effective_prompt_columns;

/// The key of a job's effective prompt version: its own newest (scope key bound at `$n`),
/// else the newest global one.
macro_rules! effective_prompt_key {
    ($own:literal) => {
        concat!(
            "(SELECT q.scope_key, q.version FROM prompt_versions q WHERE q.scope_key IN (",
            $own,
            ", 'global') ORDER BY CASE WHEN q.scope_key = 'global' THEN 1 ELSE 0 END, q.version DESC LIMIT 1)"
        )
    };
}
use effective_prompt_key;

/// The effective prompt read with [`effective_prompt_columns`]; none when the join found none.
fn prompt_from_row(r: &AnyRow, job_id: &JobId) -> Result<Option<PromptVersion>, StoreError> {
    let Some(key) = r.try_get::<Option<String>, _>("p_scope")? else {
        return Ok(None);
    };
    Ok(Some(PromptVersion {
        scope: if key == "global" {
            PromptScope::Global
        } else {
            PromptScope::Job(job_id.clone())
        },
        version: r.try_get("p_version")?,
        prompt: r.try_get("p_prompt")?,
        created_at: r.try_get("p_created_at")?,
        scope_created_at: r.try_get("p_since")?,
        response_format: r.try_get("p_response_format")?,
    }))
}
