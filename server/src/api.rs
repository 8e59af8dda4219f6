//! The HTTP admin API under `/api/v1/`, plus `/healthz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use relais_core::access::{Identity, Role, Scope};
use relais_core::audit::{parse_time, AuditAction, AuditFilter};
use relais_core::campaign::Campaign;
use relais_core::ledger::LedgerError;
use relais_core::site::Site;
use serde::Deserialize;
use serde_json::json;

use crate::engine::Input;
use crate::tokens;
use crate::ws::presented_token;
use crate::App;

/// An API error: a status and a message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Validation(v) => ApiError(StatusCode::UNPROCESSABLE_ENTITY, v.to_string()),
            other => {
                tracing::error!(error = %other, "ledger failure");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "storage error".into())
            }
        }
    }
}

impl From<tokens::TokenError> for ApiError {
    fn from(e: tokens::TokenError) -> Self {
        match e {
            tokens::TokenError::Exists(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            tokens::TokenError::Unknown(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            tokens::TokenError::NoScope(_) | tokens::TokenError::AllAndScope => {
                ApiError(StatusCode::BAD_REQUEST, e.to_string())
            }
            tokens::TokenError::BadName(_) => {
                ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            tokens::TokenError::Store(s) => {
                tracing::error!(error = %s, "token storage failure");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "storage error".into())
            }
        }
    }
}

fn admin(app: &App, addr: SocketAddr, headers: &HeaderMap) -> Result<Identity, ApiError> {
    match app.authenticate(addr, presented_token(headers, None)) {
        Ok(id) if id.role == Role::Admin => Ok(id),
        Ok(_) => Err(ApiError(
            StatusCode::FORBIDDEN,
            "admin token required".into(),
        )),
        Err(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed logins from this address; wait a minute".into(),
        )),
        Err(resp) => Err(ApiError(
            resp.status(),
            "missing, unknown or revoked token".into(),
        )),
    }
}

/// `GET /healthz`: 200 while the store answers and the sync engine runs.
pub async fn healthz(State(app): State<Arc<App>>) -> Response {
    if !app.engine.is_running() {
        tracing::error!("health check failed: the sync engine has stopped");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "sync engine stopped" })),
        )
            .into_response();
    }
    match app.store.len() {
        Ok(n) => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "documents": n })),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "store unavailable" })),
            )
                .into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Ok(n) = app.store.len() {
        app.metrics.documents.set(n as i64);
    }
    if app.upstream.is_some() {
        let a = app.clone();
        if let Ok(v) = tokio::task::spawn_blocking(move || a.upstream_status()).await {
            app.metrics.set_upstream(&v);
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Writes reference data through the server's ledger, then shows it to connected peers.
async fn write_reference(
    app: Arc<App>,
    write: impl FnOnce(&relais_core::ledger::Ledger) -> Result<relais_core::DocumentId, LedgerError>
        + Send
        + 'static,
) -> Result<Response, ApiError> {
    let a = app.clone();
    let id = tokio::task::spawn_blocking(move || write(&a.ledger))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    app.engine.send(Input::Reload { id }).await;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "url": id.url() })),
    )
        .into_response())
}

/// `POST /api/v1/sites`.
pub async fn add_site(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(site): Json<Site>,
) -> Result<Response, ApiError> {
    admin(&app, addr, &headers)?;
    write_reference(app, move |l| l.put_site(&site)).await
}

/// `POST /api/v1/campaigns`.
pub async fn add_campaign(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(campaign): Json<Campaign>,
) -> Result<Response, ApiError> {
    admin(&app, addr, &headers)?;
    write_reference(app, move |l| l.put_campaign(&campaign)).await
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Deserialize)]
pub struct NewToken {
    name: String,
    role: Option<Role>,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    sites: Vec<String>,
    /// The whole store (required for any role but admin when no sites or regions are given).
    #[serde(default)]
    all: bool,
}

/// `POST /api/v1/tokens`: the token is in the reply, once.
pub async fn create_token(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(req): Json<NewToken>,
) -> Result<Response, ApiError> {
    let who = admin(&app, addr, &headers)?;
    let role = req.role.unwrap_or(Role::Enumerator);
    let scope = Scope {
        regions: req.regions,
        sites: req.sites,
    };
    let scope = tokens::scope_for(role, scope, req.all)?;
    let (token, rec) = tokens::create(&app.store, &req.name, role, scope, &who.device)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": rec.name, "role": rec.role, "scope": rec.scope, "token": token })),
    )
        .into_response())
}

/// `GET /api/v1/tokens`: names, roles, scopes; never the tokens.
pub async fn list_tokens(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&app, addr, &headers)?;
    let list: Vec<_> = tokens::list(&app.store)?
        .into_iter()
        .map(|r| {
            json!({ "name": r.name, "role": r.role, "scope": r.scope,
                    "created_at": r.created_at, "revoked_at": r.revoked_at,
                    "former_scope": r.former.map(|f| f.scope) })
        })
        .collect();
    Ok(Json(list).into_response())
}

/// `DELETE /api/v1/tokens/{name}`: revokes at once and closes the device's connections.
pub async fn revoke_token(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let who = admin(&app, addr, &headers)?;
    let rec = tokens::revoke(&app.store, &name, &who.device)?;
    app.engine
        .send(Input::CloseDevice {
            device: name,
            reason: "token revoked".into(),
        })
        .await;
    Ok(Json(json!({ "name": rec.name, "revoked_at": rec.revoked_at })).into_response())
}

/// Body of `PATCH /api/v1/tokens/{name}`.
#[derive(Debug, Deserialize)]
pub struct ScopeChange {
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    sites: Vec<String>,
    /// The whole store.
    #[serde(default)]
    all: bool,
}

/// `PATCH /api/v1/tokens/{name}`: changes a token's scope. Its live connections are closed;
/// on reconnect the device is told to purge what it may no longer hold.
pub async fn rescope_token(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(req): Json<ScopeChange>,
) -> Result<Response, ApiError> {
    let who = admin(&app, addr, &headers)?;
    let scope = Scope {
        regions: req.regions,
        sites: req.sites,
    };
    let rec = tokens::set_scope(&app.store, &name, scope, req.all, &who.device)?;
    app.engine
        .send(Input::CloseDevice {
            device: name,
            reason: "token scope changed; reconnect".into(),
        })
        .await;
    Ok(Json(json!({ "name": rec.name, "role": rec.role, "scope": rec.scope })).into_response())
}

/// `DELETE /api/v1/households/{id}`: erases a household everywhere (see
/// [`relais_core::store::Store::erase`]).
pub async fn erase_household(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = admin(&app, addr, &headers)?;
    let doc = id
        .trim_start_matches("automerge:")
        .parse::<relais_core::DocumentId>()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad household id: {e}")))?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    let sent = app
        .engine
        .send(Input::Erase {
            id: doc,
            by: who.device,
            reply,
        })
        .await;
    let outcome = if sent { rx.await.ok() } else { None };
    match outcome {
        Some(Ok(true)) => Ok(Json(json!({ "id": doc, "erased": true })).into_response()),
        Some(Ok(false)) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no household {doc} in this store"),
        )),
        Some(Err(e)) => {
            tracing::error!(error = %e, "erase failed");
            Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage error".into(),
            ))
        }
        None => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "server shutting down".into(),
        )),
    }
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    since: Option<String>,
    token: Option<String>,
    action: Option<String>,
    document: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// Largest page of `GET /api/v1/audit`.
pub const AUDIT_PAGE_MAX: usize = 10_000;

/// `GET /api/v1/audit?since=&token=&action=&document=&after=&limit=`: audit entries, oldest
/// first. `next` is the `after` to ask for the following page.
pub async fn audit(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<AuditQuery>,
) -> Result<Response, ApiError> {
    admin(&app, addr, &headers)?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let filter = AuditFilter {
        since: q
            .since
            .as_deref()
            .map(parse_time)
            .transpose()
            .map_err(bad)?,
        token: q.token,
        action: q
            .action
            .as_deref()
            .map(str::parse::<AuditAction>)
            .transpose()
            .map_err(bad)?,
        document: q
            .document
            .as_deref()
            .map(|d| {
                d.trim_start_matches("automerge:")
                    .parse::<relais_core::DocumentId>()
            })
            .transpose()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad document id: {e}")))?,
    };
    let limit = q.limit.unwrap_or(1_000).clamp(1, AUDIT_PAGE_MAX);
    let store = app.store.clone();
    let after = q.after.unwrap_or(0);
    let (entries, next) =
        tokio::task::spawn_blocking(move || crate::audit_page(&store, &filter, after, limit))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| {
                tracing::error!(error = %e, "audit read failed");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "storage error".into())
            })?;
    Ok(Json(json!({ "entries": entries, "next": next })).into_response())
}

/// `GET /api/v1/devices`: every token with when its device was last connected.
pub async fn devices(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&app, addr, &headers)?;
    let seen = app.devices.snapshot();
    let list: Vec<_> = tokens::list(&app.store)?
        .into_iter()
        .map(|r| {
            let s = seen.get(&r.name);
            json!({
                "name": r.name,
                "role": r.role,
                "scope": r.scope,
                "revoked": r.revoked_at.is_some(),
                "connections": s.map(|s| s.connections).unwrap_or(0),
                "last_seen": s.map(|s| s.last_seen),
            })
        })
        .collect();
    Ok(Json(list).into_response())
}

/// `GET /api/v1/status`: what the store holds, who is connected, and the upstream link.
pub async fn status(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&app, addr, &headers)?;
    let store = app.store.clone();
    let counts = tokio::task::spawn_blocking(
        move || -> Result<serde_json::Value, relais_core::store::StoreError> {
            use relais_core::document::DocKind;
            let docs = store.list()?;
            let count = |k: DocKind| {
                docs.iter()
                    .filter(|(_, m)| m.info.kind == k && !m.info.erased)
                    .count()
            };
            Ok(json!({
                "documents": docs.len(),
                "sites": count(DocKind::Site),
                "households": count(DocKind::Household),
                "campaigns": count(DocKind::Campaign),
                "other": count(DocKind::Other),
                "erased": docs.iter().filter(|(_, m)| m.info.erased).count(),
                "feed_seq": store.last_seq()?,
            }))
        },
    )
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        tracing::error!(error = %e, "status read failed");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "storage error".into())
    })?;
    let stats = app.engine.stats().await.unwrap_or_default();
    let a = app.clone();
    let upstream = tokio::task::spawn_blocking(move || a.upstream_status())
        .await
        .unwrap_or(serde_json::Value::Null);
    Ok(Json(json!({
        "store": counts,
        "connections": stats.ready_connections,
        "loaded_documents": stats.loaded_docs,
        // How much of the merging was spread over the cores (README "Batches on several
        // cores"), for tuning `--sync-workers`; counts since the server started.
        "sync": {
            "applied_ahead": stats.applied_ahead,
            "confirmed_unloaded": stats.confirmed_unloaded,
            "frames_past_ahead_bound": stats.frames_past_ahead_bound,
        },
        "upstream": upstream,
    }))
    .into_response())
}

/// `GET /api/v1/upstream`: the link to the upstream server (null when there is none).
pub async fn upstream(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&app, addr, &headers)?;
    let a = app.clone();
    let v = tokio::task::spawn_blocking(move || a.upstream_status())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(v).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::metrics::Metrics;
    use relais_core::protocol::hub::HubConfig;
    use relais_core::store::Store;

    async fn health(app: &Arc<App>) -> (StatusCode, serde_json::Value) {
        let resp = healthz(State(app.clone())).await;
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn the_health_check_fails_once_the_sync_engine_has_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path().join("relais.redb")).unwrap());
        let metrics = Arc::new(Metrics::default());
        let (engine, thread) = Engine::start(
            store.clone(),
            HubConfig::default(),
            1 << 20,
            metrics.clone(),
            None,
        );
        let app = Arc::new(App::for_tests(store, engine, metrics));
        let (status, body) = health(&app).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ok");

        assert!(app.engine.send(Input::Die).await);
        for _ in 0..2_000 {
            if thread.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(thread.is_finished(), "the engine thread ends in time");
        assert!(thread.join().is_err(), "the engine thread panicked");
        // The store still answers, but nothing syncs: a supervisor must see it.
        assert!(app.store.len().is_ok());
        let (status, body) = health(&app).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["status"], "sync engine stopped");
    }
}
