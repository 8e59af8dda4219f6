//! True conflicts: one field written concurrently with different values on two replicas.
//!
//! Automerge keeps every concurrent value and picks one deterministic winner for plain reads.
//! Relais shows the losers too, so a data manager can decide, instead of one edit silently
//! winning.

use automerge::{ObjId, ObjType, ReadDoc, Value, ROOT};
use serde::Serialize;

use crate::document::RECORD;

/// A field of a record that holds more than one concurrent value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldConflict {
    /// Path of the field inside the record, e.g. `head_name` or `members/1/age`.
    pub path: String,
    /// Every concurrent value, the one plain reads show first.
    pub values: Vec<serde_json::Value>,
}

/// Lists every conflicted field of a document's record.
pub fn conflicts(doc: &impl automerge::ReadDoc) -> Vec<FieldConflict> {
    let mut out = Vec::new();
    if let Ok(Some((Value::Object(t), obj))) = doc.get(ROOT, RECORD) {
        walk(doc, &obj, t, String::new(), &mut out);
    }
    out
}

fn walk(
    doc: &impl automerge::ReadDoc,
    obj: &ObjId,
    t: ObjType,
    path: String,
    out: &mut Vec<FieldConflict>,
) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}/{k}")
        }
    };
    match t {
        ObjType::Map | ObjType::Table => {
            let keys: Vec<String> = doc.keys(obj).collect();
            for k in keys {
                visit(doc, obj, automerge::Prop::Map(k.clone()), join(&k), out);
            }
        }
        ObjType::List => {
            for i in 0..doc.length(obj) {
                visit(doc, obj, automerge::Prop::Seq(i), join(&i.to_string()), out);
            }
        }
        ObjType::Text => {}
    }
}

fn visit<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    prop: automerge::Prop,
    path: String,
    out: &mut Vec<FieldConflict>,
) {
    let Ok(values) = doc.get_all(obj, prop) else {
        return;
    };
    if values.len() > 1 {
        out.push(FieldConflict {
            path,
            values: values.iter().map(|(v, o)| to_json(doc, v, o)).collect(),
        });
    } else if let Some((Value::Object(t), child)) = values.into_iter().next() {
        walk(doc, &child, t, path, out);
    }
}

/// Renders a value (scalar or object) as JSON, for display.
pub fn to_json(doc: &impl automerge::ReadDoc, v: &Value<'_>, obj: &ObjId) -> serde_json::Value {
    use automerge::ScalarValue as S;
    match v {
        Value::Scalar(s) => match s.as_ref() {
            S::Str(s) => serde_json::Value::String(s.to_string()),
            S::Int(i) => (*i).into(),
            S::Uint(u) => (*u).into(),
            S::F64(f) => serde_json::json!(f),
            S::Boolean(b) => (*b).into(),
            S::Null => serde_json::Value::Null,
            S::Timestamp(t) => (*t).into(),
            S::Counter(c) => i64::from(c).into(),
            other => serde_json::Value::String(other.to_string()),
        },
        Value::Object(ObjType::Map | ObjType::Table) => {
            let mut m = serde_json::Map::new();
            for k in doc.keys(obj).collect::<Vec<_>>() {
                if let Ok(Some((v, o))) = doc.get(obj, k.as_str()) {
                    m.insert(k, to_json(doc, &v, &o));
                }
            }
            serde_json::Value::Object(m)
        }
        Value::Object(ObjType::List) => serde_json::Value::Array(
            (0..doc.length(obj))
                .filter_map(|i| doc.get(obj, i).ok().flatten())
                .map(|(v, o)| to_json(doc, &v, &o))
                .collect(),
        ),
        Value::Object(ObjType::Text) => {
            serde_json::Value::String(doc.text(obj).unwrap_or_default())
        }
    }
}
