//! Reports and exports over HTTP: figures, double handouts and duplicate candidates as JSON,
//! aggregated CSV (optionally HXL-tagged), and the household-level CSV for admins.
//!
//! Every report is restricted to the caller's scope: a Mopti token sees Mopti's figures.
//! The household-level export holds personal data: admins only, and it is audited.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use relais_core::access::{Identity, Role};
use relais_core::audit::{AuditAction, AuditEntry};
use relais_core::export::{self, ExportContext, HouseholdWriter};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::ws::presented_token;
use crate::App;

fn caller(app: &App, addr: SocketAddr, headers: &HeaderMap) -> Result<Identity, ApiError> {
    app.authenticate(addr, presented_token(headers, None))
        .map_err(|resp| ApiError(resp.status(), "missing, unknown or revoked token".into()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, relais_core::ledger::LedgerError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

/// `GET /api/v1/reports/figures`: households, individuals, sex, age, vulnerabilities and
/// distributions, in the caller's scope.
pub async fn figures(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = caller(&app, addr, &headers)?;
    let a = app.clone();
    let f = blocking(move || a.ledger.report(|i| who.can_read(i))).await?;
    Ok(Json(f).into_response())
}

/// `GET /api/v1/reports/doubles`: households that received an item twice, with each handout
/// (date, site, device) and any resolution.
pub async fn doubles(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = caller(&app, addr, &headers)?;
    let a = app.clone();
    let list = blocking(move || {
        let all = a.ledger.double_distributions()?;
        let mut out = Vec::new();
        for d in all {
            if let Some(m) = a.store.meta(d.household)? {
                if who.can_read(&m.info) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    })
    .await?;
    Ok(Json(list).into_response())
}

/// `GET /api/v1/reports/duplicates`: possible duplicate registrations in the caller's scope.
pub async fn duplicates(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = caller(&app, addr, &headers)?;
    let a = app.clone();
    let list = blocking(move || {
        let mut all = Vec::new();
        for id in a.ledger.household_ids(|i| who.can_read(i))? {
            if let Some((h, _)) = a.ledger.household_lite(id)? {
                all.push((id, h));
            }
        }
        Ok(relais_core::dedup::candidates(&all))
    })
    .await?;
    Ok(Json(list).into_response())
}

/// Query of the CSV exports.
#[derive(Debug, Deserialize)]
pub struct ExportQuery {
    /// Add the HXL hashtag row.
    #[serde(default)]
    hxl: Option<String>,
    /// `#org+impl` (default `IOM`).
    org: Option<String>,
}

fn csv_response(name: &str, body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /api/v1/exports/{kind}.csv?hxl=1&org=IOM`: `sites` or `distributions`, aggregated,
/// in the caller's scope; `households` (admins only, audited), streamed.
pub async fn export(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Path(file): axum::extract::Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let who = caller(&app, addr, &headers)?;
    let hxl = q.hxl.as_deref().is_some_and(|v| v != "0" && v != "false");
    let ctx = ExportContext {
        date: relais_core::ledger::today(),
        org: q.org.unwrap_or_else(|| "IOM".into()),
    };
    let kind = file.strip_suffix(".csv").unwrap_or(&file).to_string();
    match kind.as_str() {
        "sites" | "distributions" => {
            let a = app.clone();
            let f = blocking(move || a.ledger.report(|i| who.can_read(i))).await?;
            let mut out = Vec::new();
            let written = if kind == "sites" {
                export::write_sites(&mut out, &f, &ctx, hxl)
            } else {
                export::write_distributions(&mut out, &f, &ctx, hxl)
            };
            written.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            Ok(csv_response(&file, Body::from(out)))
        }
        "households" => {
            if who.role != Role::Admin {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    "household-level exports hold personal data: admin token required".into(),
                ));
            }
            Ok(csv_response(&file, stream_households(app, who)))
        }
        other => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no export {other:?}: use sites.csv, distributions.csv or households.csv"),
        )),
    }
}

/// Sends what is written to it as body chunks of about 64 KB.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

fn stream_households(app: Arc<App>, who: Identity) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>, std::io::Error>>(8);
    // Recorded before the first byte leaves: a cut-off download was still an export.
    let entry = AuditEntry::now(who.device.clone(), AuditAction::Export, None)
        .with_detail("households.csv");
    if let Err(e) = app.store.audit(&[entry]) {
        tracing::error!(error = %e, "could not audit an export");
    }
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let run = || -> Result<u64, String> {
            let ids = app
                .ledger
                .household_ids(|_| true)
                .map_err(|e| e.to_string())?;
            let mut w = HouseholdWriter::new(ChunkWriter {
                buf: Vec::new(),
                tx,
            })
            .map_err(|e| e.to_string())?;
            for id in ids {
                if let Some((h, slots)) =
                    app.ledger.household_lite(id).map_err(|e| e.to_string())?
                {
                    w.write(id, &h, &slots).map_err(|e| e.to_string())?;
                }
            }
            let rows = w.rows();
            let mut inner = w.finish().map_err(|e| e.to_string())?;
            inner.flush().map_err(|e| e.to_string())?;
            Ok(rows)
        };
        match run() {
            Ok(rows) => tracing::info!(device = %who.device, rows, "household export"),
            Err(e) => {
                tracing::warn!(error = %e, "household export stopped");
                let _ = err_tx.blocking_send(Err(std::io::Error::other(e)));
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::from_stream(stream)
}
