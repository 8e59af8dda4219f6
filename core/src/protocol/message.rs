//! The automerge-repo network messages (protocol version "1") and their CBOR codec, plus the
//! two messages of Relais's fast-reconnect extension.
//!
//! Each message is one CBOR map in one binary WebSocket frame. The decoder accepts what JS's
//! cbor-x actually sends: maps with non-minimal length headers, `undefined` for absent
//! values, byte strings that may carry a typed-array tag, and fields in any order. It never
//! panics, and it bounds nesting, declared lengths (by the input size) and the number of
//! items in a message ([`MAX_ITEMS`]), so a hostile frame of tiny items cannot make it
//! allocate many times the frame.

use minicbor::data::Type;
use minicbor::{Decoder, Encoder};

/// The automerge-repo protocol version this implements.
pub const PROTOCOL_V1: &str = "1";
/// Offered next to "1" by Relais clients; when the server selects it, the fast-reconnect
/// messages below may be used. Stock clients never offer it, so never see them.
pub const PROTOCOL_RELAIS: &str = "relais-1";

/// Deepest nesting accepted in a message.
const MAX_DEPTH: usize = 16;

/// CBOR items (strings, numbers, arrays, map entries…) accepted in one message. Each costs
/// tens of bytes decoded, whatever its size on the wire; the largest real message, a
/// 2,000-document `relais-changes` page, has about 10,000.
pub const MAX_ITEMS: usize = 262_144;

/// Why a frame is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not well-formed CBOR, or truncated.
    #[error("malformed CBOR: {0}")]
    Cbor(String),
    /// Well-formed CBOR, but not a map.
    #[error("a message must be a CBOR map")]
    NotAMap,
    /// The `type` field is missing.
    #[error("message has no type")]
    MissingType,
    /// A type this peer does not speak.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A required field is missing.
    #[error("{ty} message lacks field {field}")]
    MissingField {
        /// Message type.
        ty: String,
        /// Field name.
        field: &'static str,
    },
    /// A field has the wrong CBOR type.
    #[error("{ty} message: field {field} has the wrong type")]
    WrongType {
        /// Message type.
        ty: String,
        /// Field name.
        field: &'static str,
    },
    /// Nested deeper than this decoder accepts.
    #[error("message nested too deeply")]
    TooDeep,
    /// More items than [`MAX_ITEMS`].
    #[error("message has more than {MAX_ITEMS} items")]
    TooManyItems,
}

/// A decoded CBOR value, as much as the protocol needs.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Bytes(Vec<u8>),
    Int(i128),
    Float(f64),
    Bool(bool),
    /// `null` and `undefined` alike: both mean "absent" in this protocol.
    Null,
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

fn cbor_err(e: minicbor::decode::Error) -> DecodeError {
    DecodeError::Cbor(e.to_string())
}

/// A declared element count larger than the bytes left cannot be honest.
fn bounded(d: &Decoder<'_>, n: u64) -> Result<usize, DecodeError> {
    let left = d.input().len().saturating_sub(d.position()) as u64;
    if n > left {
        return Err(DecodeError::Cbor(format!(
            "declared length {n} exceeds the {left} bytes left"
        )));
    }
    Ok(n as usize)
}

/// Reads the entries of an array or map, definite (`Some(n)`) or indefinite (until break).
fn items<T>(
    d: &mut Decoder<'_>,
    len: Option<u64>,
    mut item: impl FnMut(&mut Decoder<'_>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let mut out = Vec::new();
    match len {
        Some(n) => {
            let n = bounded(d, n)?;
            // Room for what a real message holds; more grows as items actually arrive.
            out.reserve(n.min(4_096));
            for _ in 0..n {
                out.push(item(d)?);
            }
        }
        None => loop {
            if d.datatype().map_err(cbor_err)? == Type::Break {
                d.skip().map_err(cbor_err)?;
                break;
            }
            out.push(item(d)?);
        },
    }
    Ok(out)
}

fn value(d: &mut Decoder<'_>, depth: usize, budget: &mut usize) -> Result<Value, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    *budget = budget.checked_sub(1).ok_or(DecodeError::TooManyItems)?;
    let t = d.datatype().map_err(cbor_err)?;
    Ok(match t {
        Type::Bool => Value::Bool(d.bool().map_err(cbor_err)?),
        Type::Null => {
            d.null().map_err(cbor_err)?;
            Value::Null
        }
        Type::Undefined => {
            d.undefined().map_err(cbor_err)?;
            Value::Null
        }
        Type::U8
        | Type::U16
        | Type::U32
        | Type::U64
        | Type::I8
        | Type::I16
        | Type::I32
        | Type::I64
        | Type::Int => {
            let i: i128 = d.int().map_err(cbor_err)?.into();
            Value::Int(i)
        }
        Type::F16 | Type::F32 | Type::F64 => Value::Float(d.f64().map_err(cbor_err)?),
        Type::Bytes => Value::Bytes(d.bytes().map_err(cbor_err)?.to_vec()),
        Type::BytesIndef => {
            let mut out = Vec::new();
            for chunk in d.bytes_iter().map_err(cbor_err)? {
                out.extend_from_slice(chunk.map_err(cbor_err)?);
            }
            Value::Bytes(out)
        }
        Type::String => Value::Text(d.str().map_err(cbor_err)?.to_string()),
        Type::StringIndef => {
            let mut out = String::new();
            for chunk in d.str_iter().map_err(cbor_err)? {
                out.push_str(chunk.map_err(cbor_err)?);
            }
            Value::Text(out)
        }
        Type::Array | Type::ArrayIndef => {
            let len = d.array().map_err(cbor_err)?;
            Value::Array(items(d, len, |d| value(d, depth + 1, budget))?)
        }
        Type::Map | Type::MapIndef => {
            let len = d.map().map_err(cbor_err)?;
            Value::Map(items(d, len, |d| {
                Ok((value(d, depth + 1, budget)?, value(d, depth + 1, budget)?))
            })?)
        }
        // Typed-array and other tags: the tagged value is what matters.
        Type::Tag => {
            d.tag().map_err(cbor_err)?;
            value(d, depth + 1, budget)?
        }
        Type::Simple => {
            d.simple().map_err(cbor_err)?;
            Value::Null
        }
        other => return Err(DecodeError::Cbor(format!("unexpected CBOR item {other:?}"))),
    })
}

/// Metadata a peer sends about itself in `join` and `peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// Stable id of the peer's storage, when it persists documents.
    pub storage_id: Option<String>,
    /// True for peers that keep nothing (sync state need not be remembered).
    pub is_ephemeral: bool,
}

/// Fields shared by `request` and `sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocMessage {
    /// Sender's declared peer id.
    pub sender_id: String,
    /// Recipient's peer id.
    pub target_id: String,
    /// Document id (bs58check text).
    pub document_id: String,
    /// An encoded `automerge::sync::Message`.
    pub data: Vec<u8>,
}

/// One document's message in a `relais-sync-batch`: on the wire `[id, data]`, or
/// `[id, data, true]` for a `request`, with the id as its 16 raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchDoc {
    /// The document.
    pub document_id: crate::DocumentId,
    /// An encoded `automerge::sync::Message`.
    pub data: Vec<u8>,
    /// The sender does not have the document (a `request`, which may be answered
    /// `doc-unavailable`).
    pub request: bool,
}

impl BatchDoc {
    /// Appends this item to an encoder (an element of the `docs` array).
    pub fn write(
        &self,
        e: &mut Encoder<Vec<u8>>,
    ) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
        e.array(if self.request { 3 } else { 2 })?
            .bytes(self.document_id.as_bytes())?
            .bytes(&self.data)?;
        if self.request {
            e.bool(true)?;
        }
        Ok(())
    }
}

/// One document in a `relais-changes` reply: its id and heads on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedDoc {
    /// Document id (bs58check text).
    pub document_id: String,
    /// Heads (32-byte change hashes) of the server's copy.
    pub heads: Vec<Vec<u8>>,
}

/// One document in the `refused` list of a `relais-changes` message: on the wire
/// `[id, reason]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Document id (bs58check text).
    pub document_id: String,
    /// Why, in words a data manager can act on ("read-only device", "out of scope", "sites
    /// and campaigns are written by managers", "erased").
    pub reason: String,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Client → server: the first message.
    Join {
        /// Declared peer id.
        sender_id: String,
        /// Versions the client speaks.
        supported_protocol_versions: Vec<String>,
        /// About the client.
        peer_metadata: PeerMetadata,
    },
    /// Server → client: the handshake reply.
    Peer {
        /// Server's peer id.
        sender_id: String,
        /// Client's peer id.
        target_id: String,
        /// Chosen version.
        selected_protocol_version: String,
        /// About the server.
        peer_metadata: PeerMetadata,
    },
    /// First sync of a document the sender does not have.
    Request(DocMessage),
    /// A sync message.
    Sync(DocMessage),
    /// The sender does not have (or will not show) the document.
    DocUnavailable {
        /// Sender.
        sender_id: String,
        /// Recipient.
        target_id: String,
        /// Document id.
        document_id: String,
    },
    /// Relayed, never stored (presence, cursors).
    Ephemeral {
        /// Sender.
        sender_id: String,
        /// Recipient.
        target_id: String,
        /// Sequence within the session.
        count: u64,
        /// Sender's session.
        session_id: String,
        /// Document id.
        document_id: String,
        /// Opaque payload.
        data: Vec<u8>,
    },
    /// Advisory goodbye.
    Leave {
        /// Sender.
        sender_id: String,
    },
    /// A fatal protocol error; the connection closes after it.
    Error {
        /// What went wrong.
        message: String,
    },
    /// Accepted and ignored (heads gossip is off by default in JS).
    RemoteSubscriptionChange {
        /// Sender.
        sender_id: String,
    },
    /// Accepted and ignored.
    RemoteHeadsChanged {
        /// Sender.
        sender_id: String,
    },
    /// Extension, either way: the `sync` and `request` messages of several documents in one
    /// frame, without the envelope each would repeat (type, sender, target, text id).
    SyncBatch {
        /// Sender.
        sender_id: String,
        /// Recipient.
        target_id: String,
        /// The documents' messages, in order.
        docs: Vec<BatchDoc>,
    },
    /// Extension, client → server: which documents changed after feed sequence `since`?
    ChangesSince {
        /// Sender.
        sender_id: String,
        /// Recipient.
        target_id: String,
        /// Cursor from the previous reply (0 the first time).
        since: u64,
    },
    /// Extension, server → client: documents changed after the cursor, in the client's scope.
    Changes {
        /// Sender.
        sender_id: String,
        /// Recipient.
        target_id: String,
        /// Changed documents with the server's heads.
        docs: Vec<FeedDoc>,
        /// Cursor to send next time.
        cursor: u64,
        /// More pages follow: ask again with `cursor`.
        more: bool,
        /// Documents the client must delete (erased, or out of its scope).
        purge: Vec<String>,
        /// Those of `purge` that were erased: keep a tombstone and never accept them again.
        /// Omitted on the wire when empty.
        erased: Vec<String>,
        /// Documents whose changes from this client the server refused, and why: the client
        /// stops waiting for them and keeps them to offer again. Omitted on the wire when
        /// empty, so peers that predate it see the same bytes as before.
        refused: Vec<Refusal>,
    },
}

struct Fields {
    ty: String,
    map: Vec<(Value, Value)>,
}

impl Fields {
    fn get(&self, name: &str) -> Option<&Value> {
        self.map.iter().find_map(|(k, v)| match k {
            Value::Text(k) if k == name => match v {
                Value::Null => None,
                v => Some(v),
            },
            _ => None,
        })
    }
    fn missing(&self, field: &'static str) -> DecodeError {
        DecodeError::MissingField {
            ty: self.ty.clone(),
            field,
        }
    }
    fn wrong(&self, field: &'static str) -> DecodeError {
        DecodeError::WrongType {
            ty: self.ty.clone(),
            field,
        }
    }
    fn text(&self, field: &'static str) -> Result<String, DecodeError> {
        match self.get(field) {
            Some(Value::Text(s)) => Ok(s.clone()),
            Some(_) => Err(self.wrong(field)),
            None => Err(self.missing(field)),
        }
    }
    fn text_or_empty(&self, field: &'static str) -> Result<String, DecodeError> {
        match self.get(field) {
            None => Ok(String::new()),
            Some(Value::Text(s)) => Ok(s.clone()),
            Some(_) => Err(self.wrong(field)),
        }
    }
    fn bytes(&self, field: &'static str) -> Result<Vec<u8>, DecodeError> {
        match self.get(field) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            Some(_) => Err(self.wrong(field)),
            None => Err(self.missing(field)),
        }
    }
    fn uint(&self, field: &'static str) -> Result<u64, DecodeError> {
        match self.get(field) {
            Some(Value::Int(i)) => u64::try_from(*i).map_err(|_| self.wrong(field)),
            Some(Value::Float(f)) if f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19 => Ok(*f as u64),
            Some(_) => Err(self.wrong(field)),
            None => Err(self.missing(field)),
        }
    }
    fn texts(&self, field: &'static str) -> Result<Vec<String>, DecodeError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Text(s) => Ok(s.clone()),
                    _ => Err(self.wrong(field)),
                })
                .collect(),
            Some(_) => Err(self.wrong(field)),
        }
    }
    fn metadata(&self) -> Result<PeerMetadata, DecodeError> {
        // The README says `metadata`, the code sends `peerMetadata`: accept both.
        let v = self.get("peerMetadata").or_else(|| self.get("metadata"));
        let Some(v) = v else {
            return Ok(PeerMetadata::default());
        };
        let Value::Map(m) = v else {
            return Err(self.wrong("peerMetadata"));
        };
        let mut meta = PeerMetadata::default();
        for (k, v) in m {
            match (k, v) {
                (Value::Text(k), Value::Text(s)) if k == "storageId" => {
                    meta.storage_id = Some(s.clone())
                }
                (Value::Text(k), Value::Bool(b)) if k == "isEphemeral" => meta.is_ephemeral = *b,
                _ => {}
            }
        }
        Ok(meta)
    }
    fn doc_message(&self) -> Result<DocMessage, DecodeError> {
        Ok(DocMessage {
            sender_id: self.text_or_empty("senderId")?,
            target_id: self.text_or_empty("targetId")?,
            document_id: self.text("documentId")?,
            data: self.bytes("data")?,
        })
    }
}

impl Message {
    /// Decodes one frame. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut d = Decoder::new(bytes);
        let mut budget = MAX_ITEMS;
        let v = value(&mut d, 0, &mut budget)?;
        if d.position() != bytes.len() {
            return Err(DecodeError::Cbor("trailing bytes after the message".into()));
        }
        let Value::Map(map) = v else {
            return Err(DecodeError::NotAMap);
        };
        let ty = map
            .iter()
            .find_map(|(k, v)| match (k, v) {
                (Value::Text(k), Value::Text(t)) if k == "type" => Some(t.clone()),
                _ => None,
            })
            .ok_or(DecodeError::MissingType)?;
        let f = Fields { ty, map };
        Ok(match f.ty.as_str() {
            "join" => Message::Join {
                sender_id: f.text("senderId")?,
                supported_protocol_versions: f.texts("supportedProtocolVersions")?,
                peer_metadata: f.metadata()?,
            },
            "peer" => Message::Peer {
                sender_id: f.text("senderId")?,
                target_id: f.text_or_empty("targetId")?,
                selected_protocol_version: f.text("selectedProtocolVersion")?,
                peer_metadata: f.metadata()?,
            },
            "request" => Message::Request(f.doc_message()?),
            "sync" => Message::Sync(f.doc_message()?),
            "doc-unavailable" => Message::DocUnavailable {
                sender_id: f.text_or_empty("senderId")?,
                target_id: f.text_or_empty("targetId")?,
                document_id: f.text("documentId")?,
            },
            "ephemeral" => Message::Ephemeral {
                sender_id: f.text_or_empty("senderId")?,
                target_id: f.text_or_empty("targetId")?,
                count: f.uint("count")?,
                session_id: f.text("sessionId")?,
                document_id: f.text("documentId")?,
                data: f.bytes("data")?,
            },
            "leave" => Message::Leave {
                sender_id: f.text_or_empty("senderId")?,
            },
            "error" => Message::Error {
                message: f.text_or_empty("message")?,
            },
            "remote-subscription-change" => Message::RemoteSubscriptionChange {
                sender_id: f.text_or_empty("senderId")?,
            },
            "remote-heads-changed" => Message::RemoteHeadsChanged {
                sender_id: f.text_or_empty("senderId")?,
            },
            "relais-sync-batch" => {
                let Some(Value::Array(items)) = f.get("docs") else {
                    return Err(f.wrong("docs"));
                };
                let docs = items
                    .iter()
                    .map(|item| match item {
                        Value::Array(v) => match v.as_slice() {
                            [Value::Bytes(id), Value::Bytes(data), rest @ ..] => {
                                let request = match rest {
                                    [] => false,
                                    [Value::Bool(b)] => *b,
                                    _ => return Err(f.wrong("docs")),
                                };
                                Ok(BatchDoc {
                                    document_id: crate::DocumentId::from_slice(id)
                                        .map_err(|_| f.wrong("docs"))?,
                                    data: data.clone(),
                                    request,
                                })
                            }
                            _ => Err(f.wrong("docs")),
                        },
                        _ => Err(f.wrong("docs")),
                    })
                    .collect::<Result<_, _>>()?;
                Message::SyncBatch {
                    sender_id: f.text_or_empty("senderId")?,
                    target_id: f.text_or_empty("targetId")?,
                    docs,
                }
            }
            "relais-changes-since" => Message::ChangesSince {
                sender_id: f.text_or_empty("senderId")?,
                target_id: f.text_or_empty("targetId")?,
                since: f.uint("since")?,
            },
            "relais-changes" => {
                let docs = match f.get("docs") {
                    None => Vec::new(),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|item| {
                            let Value::Array(pair) = item else {
                                return Err(f.wrong("docs"));
                            };
                            match pair.as_slice() {
                                [Value::Text(id), Value::Array(heads)] => Ok(FeedDoc {
                                    document_id: id.clone(),
                                    heads: heads
                                        .iter()
                                        .map(|h| match h {
                                            Value::Bytes(b) => Ok(b.clone()),
                                            _ => Err(f.wrong("docs")),
                                        })
                                        .collect::<Result<_, _>>()?,
                                }),
                                _ => Err(f.wrong("docs")),
                            }
                        })
                        .collect::<Result<_, _>>()?,
                    Some(_) => return Err(f.wrong("docs")),
                };
                Message::Changes {
                    sender_id: f.text_or_empty("senderId")?,
                    target_id: f.text_or_empty("targetId")?,
                    docs,
                    cursor: f.uint("cursor")?,
                    more: matches!(f.get("more"), Some(Value::Bool(true))),
                    purge: f.texts("purge")?,
                    erased: f.texts("erased")?,
                    refused: match f.get("refused") {
                        None => Vec::new(),
                        Some(Value::Array(items)) => items
                            .iter()
                            .map(|item| match item {
                                Value::Array(pair) => match pair.as_slice() {
                                    [Value::Text(id), Value::Text(reason)] => Ok(Refusal {
                                        document_id: id.clone(),
                                        reason: reason.clone(),
                                    }),
                                    _ => Err(f.wrong("refused")),
                                },
                                _ => Err(f.wrong("refused")),
                            })
                            .collect::<Result<_, _>>()?,
                        Some(_) => return Err(f.wrong("refused")),
                    },
                }
            }
            other => return Err(DecodeError::UnknownType(other.chars().take(64).collect())),
        })
    }

    /// Encodes as one CBOR map (minimal headers).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        // Writing to a Vec cannot fail.
        self.write(&mut e).expect("encoding to a Vec is infallible");
        e.into_writer()
    }

    fn write(
        &self,
        e: &mut Encoder<Vec<u8>>,
    ) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
        fn meta(
            e: &mut Encoder<Vec<u8>>,
            m: &PeerMetadata,
        ) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
            e.str("peerMetadata")?;
            match &m.storage_id {
                Some(s) => {
                    e.map(2)?.str("storageId")?.str(s)?;
                }
                None => {
                    e.map(1)?;
                }
            }
            e.str("isEphemeral")?.bool(m.is_ephemeral)?;
            Ok(())
        }
        match self {
            Message::Join {
                sender_id,
                supported_protocol_versions,
                peer_metadata,
            } => {
                e.map(4)?.str("type")?.str("join")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("supportedProtocolVersions")?
                    .array(supported_protocol_versions.len() as u64)?;
                for v in supported_protocol_versions {
                    e.str(v)?;
                }
                meta(e, peer_metadata)?;
            }
            Message::Peer {
                sender_id,
                target_id,
                selected_protocol_version,
                peer_metadata,
            } => {
                e.map(5)?.str("type")?.str("peer")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("selectedProtocolVersion")?
                    .str(selected_protocol_version)?;
                meta(e, peer_metadata)?;
            }
            Message::Request(m) | Message::Sync(m) => {
                let ty = if matches!(self, Message::Request(_)) {
                    "request"
                } else {
                    "sync"
                };
                e.map(5)?.str("type")?.str(ty)?;
                e.str("senderId")?.str(&m.sender_id)?;
                e.str("targetId")?.str(&m.target_id)?;
                e.str("documentId")?.str(&m.document_id)?;
                e.str("data")?.bytes(&m.data)?;
            }
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => {
                e.map(4)?.str("type")?.str("doc-unavailable")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("documentId")?.str(document_id)?;
            }
            Message::Ephemeral {
                sender_id,
                target_id,
                count,
                session_id,
                document_id,
                data,
            } => {
                e.map(7)?.str("type")?.str("ephemeral")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("count")?.u64(*count)?;
                e.str("sessionId")?.str(session_id)?;
                e.str("documentId")?.str(document_id)?;
                e.str("data")?.bytes(data)?;
            }
            Message::Leave { sender_id } => {
                e.map(2)?.str("type")?.str("leave")?;
                e.str("senderId")?.str(sender_id)?;
            }
            Message::Error { message } => {
                e.map(2)?.str("type")?.str("error")?;
                e.str("message")?.str(message)?;
            }
            Message::RemoteSubscriptionChange { sender_id } => {
                e.map(2)?.str("type")?.str("remote-subscription-change")?;
                e.str("senderId")?.str(sender_id)?;
            }
            Message::RemoteHeadsChanged { sender_id } => {
                e.map(2)?.str("type")?.str("remote-heads-changed")?;
                e.str("senderId")?.str(sender_id)?;
            }
            Message::SyncBatch {
                sender_id,
                target_id,
                docs,
            } => {
                e.map(4)?.str("type")?.str("relais-sync-batch")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("docs")?.array(docs.len() as u64)?;
                for d in docs {
                    d.write(e)?;
                }
            }
            Message::ChangesSince {
                sender_id,
                target_id,
                since,
            } => {
                e.map(4)?.str("type")?.str("relais-changes-since")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("since")?.u64(*since)?;
            }
            Message::Changes {
                sender_id,
                target_id,
                docs,
                cursor,
                more,
                purge,
                erased,
                refused,
            } => {
                let fields = 7 + u64::from(!erased.is_empty()) + u64::from(!refused.is_empty());
                e.map(fields)?.str("type")?.str("relais-changes")?;
                e.str("senderId")?.str(sender_id)?;
                e.str("targetId")?.str(target_id)?;
                e.str("docs")?.array(docs.len() as u64)?;
                for d in docs {
                    e.array(2)?.str(&d.document_id)?;
                    e.array(d.heads.len() as u64)?;
                    for h in &d.heads {
                        e.bytes(h)?;
                    }
                }
                e.str("cursor")?.u64(*cursor)?;
                e.str("more")?.bool(*more)?;
                e.str("purge")?.array(purge.len() as u64)?;
                for p in purge {
                    e.str(p)?;
                }
                if !erased.is_empty() {
                    e.str("erased")?.array(erased.len() as u64)?;
                    for p in erased {
                        e.str(p)?;
                    }
                }
                if !refused.is_empty() {
                    e.str("refused")?.array(refused.len() as u64)?;
                    for r in refused {
                        e.array(2)?.str(&r.document_id)?.str(&r.reason)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The message's `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Join { .. } => "join",
            Message::Peer { .. } => "peer",
            Message::Request(_) => "request",
            Message::Sync(_) => "sync",
            Message::DocUnavailable { .. } => "doc-unavailable",
            Message::Ephemeral { .. } => "ephemeral",
            Message::Leave { .. } => "leave",
            Message::Error { .. } => "error",
            Message::RemoteSubscriptionChange { .. } => "remote-subscription-change",
            Message::RemoteHeadsChanged { .. } => "remote-heads-changed",
            Message::SyncBatch { .. } => "relais-sync-batch",
            Message::ChangesSince { .. } => "relais-changes-since",
            Message::Changes { .. } => "relais-changes",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        let dm = DocMessage {
            sender_id: "a".into(),
            target_id: "b".into(),
            document_id: "doc".into(),
            data: vec![0x42, 1, 2],
        };
        vec![
            Message::Join {
                sender_id: "a".into(),
                supported_protocol_versions: vec!["1".into(), PROTOCOL_RELAIS.into()],
                peer_metadata: PeerMetadata {
                    storage_id: Some("s".into()),
                    is_ephemeral: false,
                },
            },
            Message::Peer {
                sender_id: "srv".into(),
                target_id: "a".into(),
                selected_protocol_version: "1".into(),
                peer_metadata: PeerMetadata::default(),
            },
            Message::Request(dm.clone()),
            Message::Sync(dm),
            Message::DocUnavailable {
                sender_id: "s".into(),
                target_id: "t".into(),
                document_id: "d".into(),
            },
            Message::Ephemeral {
                sender_id: "s".into(),
                target_id: "t".into(),
                count: 7,
                session_id: "x".into(),
                document_id: "d".into(),
                data: vec![1],
            },
            Message::Leave {
                sender_id: "s".into(),
            },
            Message::Error {
                message: "bad".into(),
            },
            Message::ChangesSince {
                sender_id: "s".into(),
                target_id: "t".into(),
                since: 42,
            },
            Message::SyncBatch {
                sender_id: "s".into(),
                target_id: "t".into(),
                docs: vec![
                    BatchDoc {
                        document_id: crate::DocumentId::from_bytes([3; 16]),
                        data: vec![0x42, 9],
                        request: false,
                    },
                    BatchDoc {
                        document_id: crate::DocumentId::from_bytes([4; 16]),
                        data: vec![0x42],
                        request: true,
                    },
                ],
            },
            Message::Changes {
                sender_id: "s".into(),
                target_id: "t".into(),
                docs: vec![FeedDoc {
                    document_id: "d".into(),
                    heads: vec![vec![7; 32]],
                }],
                cursor: 43,
                more: true,
                purge: vec!["p".into(), "q".into()],
                erased: vec!["q".into()],
                refused: Vec::new(),
            },
            Message::Changes {
                sender_id: "s".into(),
                target_id: "c".into(),
                docs: Vec::new(),
                cursor: 0,
                more: false,
                purge: vec!["p".into()],
                erased: Vec::new(),
                refused: Vec::new(),
            },
            Message::Changes {
                sender_id: "s".into(),
                target_id: "c".into(),
                docs: Vec::new(),
                cursor: 0,
                more: false,
                purge: Vec::new(),
                erased: Vec::new(),
                refused: vec![
                    Refusal {
                        document_id: "r".into(),
                        reason: "read-only device".into(),
                    },
                    Refusal {
                        document_id: "s".into(),
                        reason: "change out of scope".into(),
                    },
                ],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            assert_eq!(
                Message::decode(&m.encode()).unwrap(),
                m,
                "{}",
                m.type_name()
            );
        }
    }

    #[test]
    fn accepts_cbor_x_quirks() {
        // A join as cbor-x writes it: 16-bit map header, `undefined` storageId.
        let mut b = vec![0xb9, 0x00, 0x04];
        let mut e = Encoder::new(Vec::new());
        e.str("type").unwrap().str("join").unwrap();
        e.str("senderId").unwrap().str("peer-1").unwrap();
        e.str("supportedProtocolVersions")
            .unwrap()
            .array(1)
            .unwrap()
            .str("1")
            .unwrap();
        e.str("peerMetadata").unwrap().map(2).unwrap();
        e.str("storageId").unwrap().undefined().unwrap();
        e.str("isEphemeral").unwrap().bool(true).unwrap();
        b.extend(e.into_writer());
        let m = Message::decode(&b).unwrap();
        assert_eq!(
            m,
            Message::Join {
                sender_id: "peer-1".into(),
                supported_protocol_versions: vec!["1".into()],
                peer_metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true
                },
            }
        );
    }

    #[test]
    fn accepts_indefinite_maps_and_arrays() {
        let mut e = Encoder::new(Vec::new());
        e.begin_map().unwrap();
        e.str("type").unwrap().str("join").unwrap();
        e.str("senderId").unwrap().str("p").unwrap();
        e.str("supportedProtocolVersions")
            .unwrap()
            .begin_array()
            .unwrap();
        e.str("1").unwrap().end().unwrap();
        e.end().unwrap();
        match Message::decode(&e.into_writer()).unwrap() {
            Message::Join {
                supported_protocol_versions,
                ..
            } => assert_eq!(supported_protocol_versions, vec!["1".to_string()]),
            other => panic!("{other:?}"),
        }
        // An indefinite map that never ends is truncated input, not a hang or a panic.
        assert!(Message::decode(&[0xbf, 0x64, b't', b'y', b'p', b'e']).is_err());
    }

    #[test]
    fn accepts_metadata_spelling_and_tagged_bytes() {
        let mut e = Encoder::new(Vec::new());
        e.map(5).unwrap();
        e.str("type").unwrap().str("sync").unwrap();
        e.str("senderId").unwrap().str("a").unwrap();
        e.str("targetId").unwrap().str("b").unwrap();
        e.str("documentId").unwrap().str("d").unwrap();
        e.str("data")
            .unwrap()
            .tag(minicbor::data::Tag::new(64))
            .unwrap()
            .bytes(&[1, 2])
            .unwrap();
        let m = Message::decode(&e.into_writer()).unwrap();
        assert!(matches!(m, Message::Sync(ref d) if d.data == vec![1, 2]));
    }

    #[test]
    fn refuses_bad_input_with_clear_errors() {
        assert!(matches!(Message::decode(&[]), Err(DecodeError::Cbor(_))));
        assert!(matches!(
            Message::decode(&[0xff, 0x00]),
            Err(DecodeError::Cbor(_))
        ));
        assert_eq!(Message::decode(&[0x01]), Err(DecodeError::NotAMap));
        // A map that claims 2^32 entries in a 9-byte frame.
        assert!(matches!(
            Message::decode(&[0xba, 0xff, 0xff, 0xff, 0xff, 0x61, 0x61, 0x61, 0x61]),
            Err(DecodeError::Cbor(_))
        ));
        let mut e = Encoder::new(Vec::new());
        e.map(1).unwrap().str("type").unwrap().str("bogus").unwrap();
        assert_eq!(
            Message::decode(&e.into_writer()),
            Err(DecodeError::UnknownType("bogus".into()))
        );
        let mut e = Encoder::new(Vec::new());
        e.map(4).unwrap().str("type").unwrap().str("sync").unwrap();
        e.str("senderId").unwrap().str("a").unwrap();
        e.str("documentId").unwrap().u32(5).unwrap();
        e.str("data").unwrap().bytes(&[]).unwrap();
        assert_eq!(
            Message::decode(&e.into_writer()),
            Err(DecodeError::WrongType {
                ty: "sync".into(),
                field: "documentId"
            })
        );
        // Many tiny items: a frame of one-byte integers would decode to 32 bytes each.
        let mut many = vec![0x9a];
        many.extend_from_slice(&((MAX_ITEMS as u32) + 1).to_be_bytes());
        many.extend(std::iter::repeat_n(0x01, MAX_ITEMS + 1));
        assert_eq!(Message::decode(&many), Err(DecodeError::TooManyItems));
        // Deep nesting.
        let mut deep = vec![0x81; 100];
        deep.push(0x01);
        assert_eq!(Message::decode(&deep), Err(DecodeError::TooDeep));
        // Truncated valid message.
        let full = all()[3].encode();
        for cut in 0..full.len() {
            assert!(Message::decode(&full[..cut]).is_err());
        }
    }

    #[test]
    fn refusals_are_left_out_when_there_are_none_and_checked_when_there_are() {
        let listing = |refused: Vec<Refusal>| Message::Changes {
            sender_id: "s".into(),
            target_id: "c".into(),
            docs: Vec::new(),
            cursor: 0,
            more: false,
            purge: Vec::new(),
            erased: Vec::new(),
            refused,
        };
        // Without refusals a listing is the 7-field map clients before the field decode.
        let plain = listing(Vec::new()).encode();
        assert_eq!(plain[0], 0xa7);
        assert!(!plain.windows(7).any(|w| w == b"refused"));
        // A refusal that is not an [id, reason] pair is a wrong type, not a silent drop.
        for bad in [
            &[0x81, 0x61, b'r'][..],
            &[0x81, 0x82, 0x61, b'r', 0x01],
            &[0x01],
        ] {
            let mut e = Encoder::new(Vec::new());
            e.map(2)
                .unwrap()
                .str("type")
                .unwrap()
                .str("relais-changes")
                .unwrap();
            e.str("refused").unwrap();
            let mut b = e.into_writer();
            b.extend_from_slice(bad);
            b.splice(0..1, [0xa3]);
            b.extend_from_slice(&[0x66, b'c', b'u', b'r', b's', b'o', b'r', 0x00]);
            assert_eq!(
                Message::decode(&b),
                Err(DecodeError::WrongType {
                    ty: "relais-changes".into(),
                    field: "refused"
                }),
                "{bad:?}"
            );
        }
    }
}
