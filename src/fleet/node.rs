//! A YAML document as a tree of nodes that each remember their line and column,
//! and a `serde::Deserializer` over one node. serde stops at the first error, so
//! `fleet` parses the whole file into this tree once and then deserializes each
//! section and each agent from its own node: one broken agent cannot hide the
//! errors of another. Owns YAML syntax, input budgets and duplicate keys; knows
//! nothing of the fleet schema.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{
    self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Unexpected, Visitor,
};
use serde_saphyr::options::{AliasLimits, DuplicateKeyPolicy};
use serde_saphyr::{MessageFormatter, UserMessageFormatter};

/// 1-based line and column in the fleet file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    pub const fn new(line: u32, column: u32) -> Self {
        Self { line, column }
    }
}

/// What a scalar was typed as by YAML's core schema; its source text is kept
/// too, so that `PORT: 8080` or `RATIO: 1.50` reach a string field verbatim.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Scalar {
        kind: Scalar,
        text: String,
    },
    Seq(Vec<Node>),
    /// Entries in file order. Duplicate keys are kept here (so they can be
    /// reported with both locations) and removed by [`dedup_keys`].
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    /// Byte range in the source, when the parser knows it; used to recover the
    /// exact text of numbers and booleans.
    bytes: Option<(usize, usize)>,
    pub value: Value,
}

impl Node {
    pub fn new(pos: Pos, value: Value) -> Self {
        Self {
            pos,
            bytes: None,
            value,
        }
    }

    /// The text of a scalar key or value (`None` for null and collections).
    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// This node's location without its value, to rebuild a pruned copy.
    fn clone_empty(&self) -> Self {
        Self {
            pos: self.pos,
            bytes: self.bytes,
            value: Value::Null,
        }
    }

    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// A short name of the node's kind for messages (`a list`, `a mapping`, ...).
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing",
            Value::Scalar {
                kind: Scalar::Bool(_),
                ..
            } => "a boolean",
            Value::Scalar {
                kind: Scalar::Int(_),
                ..
            } => "an integer",
            Value::Scalar {
                kind: Scalar::Float(_),
                ..
            } => "a number",
            Value::Scalar {
                kind: Scalar::Str, ..
            } => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax error or a breached input budget: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Limits for a hand-written fleet file: generous for real fleets, far below
/// what it takes to make the supervisor spend noticeable memory or time.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 200_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_depth: 32,
            max_documents: 1,
            max_nodes: 100_000,
            max_total_scalar_bytes: 4 * 1024 * 1024,
            max_merge_keys: 1_000,
        },
        alias_limits: alias_limits(),
        // Keep every entry: duplicates are reported by `dedup_keys` with both
        // locations instead of stopping the parse at the first one.
        duplicate_keys: DuplicateKeyPolicy::PassThrough,
    }
}

/// Alias bombs expand a few bytes into millions of nodes; a fleet file never
/// needs more than a handful of replayed events per anchor.
fn alias_limits() -> AliasLimits {
    let mut limits = AliasLimits::default();
    limits.max_total_replayed_events = 20_000;
    limits.max_replay_stack_depth = 16;
    limits.max_alias_expansions_per_anchor = 1_000;
    limits
}

/// Parses one YAML document into a node tree. An empty document is `Null`.
pub fn parse(source: &str) -> Result<Node, SyntaxError> {
    if source.trim().is_empty() {
        return Ok(Node::new(Pos::new(1, 1), Value::Null));
    }
    let mut root: Node = serde_saphyr::from_str_with_options(source, options()).map_err(|err| {
        let err = err.without_snippet();
        let pos = err
            .location()
            .map(|l| Pos::new(to_u32(l.line()), to_u32(l.column())))
            .filter(|p| p.line > 0)
            .unwrap_or(Pos::new(1, 1));
        let message = printable(&UserMessageFormatter.format_message(err));
        match unclosed_flow_before(source, pos) {
            // The parser noticed later what went wrong earlier: point there.
            Some((opened, bracket)) => SyntaxError {
                pos: opened,
                message: format!(
                    "`{bracket}` is never closed (the parser noticed at {}:{}: {message})",
                    pos.line, pos.column
                ),
            },
            None => SyntaxError { pos, message },
        }
    })?;
    restore_scalar_text(&mut root, source);
    Ok(root)
}

/// The real mistake behind a syntax error found at `at`, when it is a `[` or
/// `{` left open on an earlier line: the lines after it then read as part of
/// that flow collection, and the parser only fails where they stop making
/// sense. The innermost such bracket, with where it is. Brackets count only
/// where a flow collection can start (after `:`, `-`, `,`, `?`, another
/// bracket, or first on a line), outside quotes and comments.
fn unclosed_flow_before(source: &str, at: Pos) -> Option<(Pos, char)> {
    let starts_flow = |before: Option<char>| before.is_none_or(|b| ":-,[{?".contains(b));
    let mut open: Vec<(Pos, char)> = Vec::new();
    for (index, line) in source.lines().enumerate() {
        let line_no = u32::try_from(index + 1).unwrap_or(u32::MAX);
        if line_no > at.line {
            break;
        }
        let mut quote: Option<char> = None;
        let mut previous = None::<char>;
        // The last character that was not a space.
        let mut before = None::<char>;
        let mut chars = line.chars().enumerate().peekable();
        while let Some((i, c)) = chars.next() {
            let column = u32::try_from(i + 1).unwrap_or(u32::MAX);
            if line_no == at.line && column >= at.column {
                break;
            }
            match quote {
                Some('"') if c == '\\' => {
                    chars.next();
                }
                Some(q) if c == q => {
                    // `''` inside single quotes is an escaped quote.
                    if q == '\'' && chars.peek().is_some_and(|(_, n)| *n == '\'') {
                        chars.next();
                    } else {
                        quote = None;
                    }
                }
                Some(_) => {}
                None => match c {
                    '#' if previous.is_none_or(char::is_whitespace) => break,
                    '"' | '\'' if starts_flow(before) => quote = Some(c),
                    '[' | '{' if starts_flow(before) => open.push((Pos::new(line_no, column), c)),
                    ']' | '}' => {
                        open.pop();
                    }
                    _ => {}
                },
            }
            previous = Some(c);
            if !c.is_whitespace() {
                before = Some(c);
            }
        }
    }
    open.pop().filter(|(pos, _)| pos.line < at.line)
}

/// Control characters from the input must not reach a terminal.
fn printable(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Numbers and booleans were typed by the parser; put back their source text.
fn restore_scalar_text(node: &mut Node, source: &str) {
    match &mut node.value {
        Value::Scalar { kind, text } if *kind != Scalar::Str => {
            if let Some(raw) = node
                .bytes
                .and_then(|(start, len)| source.get(start..start.saturating_add(len)))
            {
                let raw = raw.trim();
                if !raw.is_empty() && !raw.starts_with(['*', '&', '!']) {
                    *text = raw.to_owned();
                }
            }
        }
        Value::Seq(items) => items
            .iter_mut()
            .for_each(|n| restore_scalar_text(n, source)),
        Value::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
            restore_scalar_text(k, source);
            restore_scalar_text(v, source);
        }),
        _ => {}
    }
}

/// A key that appears twice in one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// Keys from the root down to the mapping holding the duplicate.
    pub path: Vec<String>,
    pub key: String,
    pub pos: Pos,
    pub first: Pos,
}

/// Removes repeated keys from every mapping (the first one stays) and returns
/// them, so they are reported once each and deserialization sees clean maps.
pub fn dedup_keys(node: &mut Node) -> Vec<DuplicateKey> {
    let mut found = Vec::new();
    dedup_in(node, &mut Vec::new(), &mut found);
    found
}

fn dedup_in(node: &mut Node, path: &mut Vec<String>, found: &mut Vec<DuplicateKey>) {
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|n| dedup_in(n, path, found)),
        Value::Map(entries) => {
            let mut seen: Vec<(String, Pos)> = Vec::new();
            entries.retain(|(key, _)| {
                let Some(text) = key.as_text() else {
                    return true;
                };
                if let Some((_, first)) = seen.iter().find(|(k, _)| k == text) {
                    found.push(DuplicateKey {
                        path: path.clone(),
                        key: text.to_owned(),
                        pos: key.pos,
                        first: *first,
                    });
                    false
                } else {
                    seen.push((text.to_owned(), key.pos));
                    true
                }
            });
            for (key, value) in entries.iter_mut() {
                path.push(key.as_text().unwrap_or("?").to_owned());
                dedup_in(value, path, found);
                path.pop();
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Building the tree from serde-saphyr.

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<Value>::deserialize(deserializer)?;
        let loc = spanned.referenced;
        let span = loc.span();
        let bytes = span
            .byte_offset()
            .zip(span.byte_len())
            .and_then(|(o, l)| Some((usize::try_from(o).ok()?, usize::try_from(l).ok()?)));
        Ok(Node {
            pos: Pos::new(to_u32(loc.line()), to_u32(loc.column())),
            bytes,
            value: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl ValueVisitor {
    fn typed(kind: Scalar, text: String) -> Value {
        Value::Scalar { kind, text }
    }
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Self::typed(Scalar::Bool(v), v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Self::typed(Scalar::Int(v.into()), v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Self::typed(Scalar::Int(v.into()), v.to_string()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Self::typed(Scalar::Int(v), v.to_string()))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match i128::try_from(v) {
            Ok(i) => Ok(Self::typed(Scalar::Int(i), v.to_string())),
            Err(_) => Ok(Self::typed(Scalar::Str, v.to_string())),
        }
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Self::typed(Scalar::Float(v), v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Self::typed(Scalar::Str, v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Self::typed(Scalar::Str, v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Node>()? {
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

// ---------------------------------------------------------------------------
// Deserializing typed structs from a node.

/// One step from a node to a child: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A deserialization error at the innermost node that caused it, with the
/// path from the node deserialization started at (e.g. `restart.backoff_max`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    pub pos: Option<Pos>,
    /// Innermost step last; filled in while the error travels outwards.
    path: Vec<Step>,
    pub message: String,
    pub missing_field: bool,
}

impl NodeError {
    fn at(mut self, pos: Pos) -> Self {
        self.pos.get_or_insert(pos);
        self
    }

    fn under(mut self, step: Step) -> Self {
        self.path.insert(0, step);
        self
    }

    /// The path as written in messages: `restart.backoff_max`, `command[0]`;
    /// empty when the error is at the starting node itself.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for step in &self.path {
            match step {
                Step::Key(k) if out.is_empty() => out.push_str(k),
                Step::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    /// The message with its path, ready for a user: ``restart`: unknown field ...`.
    pub fn describe(&self) -> String {
        let path = self.path();
        if path.is_empty() {
            self.message.clone()
        } else {
            format!("`{path}`: {}", self.message)
        }
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl std::error::Error for NodeError {}

impl de::Error for NodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            pos: None,
            path: Vec::new(),
            message: msg.to_string(),
            missing_field: false,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Self {
            missing_field: true,
            ..Self::custom(format_args!("missing field `{field}`"))
        }
    }
}

/// Deserializes `T` from `node`; errors carry the location of the node at fault.
pub fn from_node<'a, T: Deserialize<'a>>(node: &'a Node) -> Result<T, NodeError> {
    T::deserialize(node)
}

/// Every error found in a mapping, and what could still be read from it.
#[derive(Debug)]
pub struct Partial<T> {
    pub errors: Vec<NodeError>,
    /// The value deserialized from the entries that are not broken, when that
    /// works, so that semantic checks can still run on the rest.
    pub rest: Option<T>,
}

/// Like [`from_node`], but when `node` is a mapping and deserialization fails,
/// each entry is tried on its own too, and an entry that still fails and holds
/// a mapping (a nested section, an `env:` map) is split the same way, down to
/// the broken leaves: every broken field is reported, not only the first, and
/// `rest` keeps every well-formed sibling. Fields of `T` that may be left out
/// must be optional. Lists are leaves: their first error stands for them.
pub fn from_node_all<T: de::DeserializeOwned>(node: &Node) -> Result<T, Partial<T>> {
    let first = match from_node::<T>(node) {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    if node.entries().is_none() {
        return Err(Partial {
            errors: vec![first],
            rest: None,
        });
    }
    let mut errors = Vec::new();
    if first.missing_field {
        errors.push(first.clone());
    }
    let kept = keep_well_formed::<T>(node, &|n| n, &mut errors);
    if errors.is_empty() {
        errors.push(first);
    }
    let rest = from_node::<T>(&kept).ok();
    Err(Partial { errors, rest })
}

/// The mapping `node` with its broken entries left out (and broken mappings
/// inside entries pruned the same way), recording each entry's error.
/// `within` rebuilds the path from the starting node down to `node`, holding
/// only that path, so `T` can judge one entry at a time whatever the depth.
/// A missing field is not an entry's fault (the entry is tried alone).
fn keep_well_formed<T: de::DeserializeOwned>(
    node: &Node,
    within: &dyn Fn(Node) -> Node,
    errors: &mut Vec<NodeError>,
) -> Node {
    let Some(entries) = node.entries() else {
        return node.clone();
    };
    let mut kept = Vec::new();
    for (key, value) in entries {
        let alone = |value: Node| {
            within(Node {
                value: Value::Map(vec![(key.clone(), value)]),
                ..node.clone_empty()
            })
        };
        let err = match from_node::<T>(&alone(value.clone())) {
            Err(err) if !err.missing_field => err,
            _ => {
                kept.push((key.clone(), value.clone()));
                continue;
            }
        };
        if !matches!(value.value, Value::Map(_)) {
            push_new(errors, err);
            continue;
        }
        // Split the nested mapping; if what is left of it is accepted, keep
        // that. If the mapping itself is wrong (a map where a string belongs),
        // its entries all report that one error, and it is dropped.
        let pruned = keep_well_formed::<T>(value, &alone, errors);
        match from_node::<T>(&alone(pruned.clone())) {
            Err(err) if !err.missing_field => push_new(errors, err),
            _ => kept.push((key.clone(), pruned)),
        }
    }
    Node {
        value: Value::Map(kept),
        ..node.clone_empty()
    }
}

fn push_new(errors: &mut Vec<NodeError>, err: NodeError) {
    if !errors.contains(&err) {
        errors.push(err);
    }
}

/// A value together with the location of the node it came from, for semantic
/// errors found after deserialization (bad names, inconsistent durations).
#[derive(Debug, Clone)]
pub struct At<T> {
    pub pos: Pos,
    pub value: T,
}

impl<T: PartialEq> PartialEq for At<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}
impl<T: Eq> Eq for At<T> {}
impl<T: PartialOrd> PartialOrd for At<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.value.partial_cmp(&other.value)
    }
}
impl<T: Ord> Ord for At<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

const AT_MARKER: &str = "__fleet_node_at";

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AtVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for AtVisitor<T> {
            type Value = At<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value with its location")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<At<T>, A::Error> {
                let line: Option<(String, u32)> = map.next_entry()?;
                let column: Option<(String, u32)> = map.next_entry()?;
                let value: Option<(String, T)> = map.next_entry()?;
                match (line, column, value) {
                    (Some((_, line)), Some((_, column)), Some((_, value))) => Ok(At {
                        pos: Pos::new(line, column),
                        value,
                    }),
                    _ => Err(de::Error::custom("internal: malformed location wrapper")),
                }
            }
        }
        deserializer.deserialize_struct(
            AT_MARKER,
            &["line", "column", "value"],
            AtVisitor(PhantomData),
        )
    }
}

/// Feeds `At`'s visitor: `line`, `column`, then the node itself as `value`.
struct AtAccess<'a> {
    node: &'a Node,
    next: u8,
}

impl<'de> MapAccess<'de> for AtAccess<'de> {
    type Error = NodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, NodeError> {
        let key = match self.next {
            0 => "line",
            1 => "column",
            2 => "value",
            _ => return Ok(None),
        };
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, NodeError> {
        let step = self.next;
        self.next += 1;
        match step {
            0 => seed.deserialize(self.node.pos.line.into_deserializer()),
            1 => seed.deserialize(self.node.pos.column.into_deserializer()),
            _ => seed.deserialize(self.node),
        }
    }
}

struct SeqNodes<'a> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
}

impl<'de> SeqAccess<'de> for SeqNodes<'de> {
    type Error = NodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, NodeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => seed
                .deserialize(node)
                .map(Some)
                .map_err(|e| e.at(node.pos).under(Step::Index(i))),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapNodes<'a> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    value: Option<&'a (Node, Node)>,
}

impl<'de> MapAccess<'de> for MapNodes<'de> {
    type Error = NodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, NodeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(entry);
        seed.deserialize(&entry.0)
            .map(Some)
            .map_err(|e| e.at(entry.0.pos))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, NodeError> {
        let Some((key, value)) = self.value.take() else {
            return Err(de::Error::custom(
                "internal: value requested before its key",
            ));
        };
        let step = Step::Key(key.as_text().unwrap_or("?").to_owned());
        seed.deserialize(value)
            .map_err(|e| e.at(value.pos).under(step))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// What a node is, in serde's terms, for `invalid type` messages.
fn unexpected(node: &Node) -> Unexpected<'_> {
    match &node.value {
        Value::Null => Unexpected::Other("null"),
        Value::Scalar {
            kind: Scalar::Bool(b),
            ..
        } => Unexpected::Bool(*b),
        Value::Scalar {
            kind: Scalar::Int(_),
            ..
        } => Unexpected::Other("integer"),
        Value::Scalar {
            kind: Scalar::Float(f),
            ..
        } => Unexpected::Float(*f),
        Value::Scalar {
            kind: Scalar::Str,
            text,
        } => Unexpected::Str(text),
        Value::Seq(_) => Unexpected::Seq,
        Value::Map(_) => Unexpected::Map,
    }
}

impl<'de> Node {
    fn invalid<V: Visitor<'de>>(&self, visitor: &V) -> NodeError {
        let mut err = <NodeError as de::Error>::invalid_type(unexpected(self), visitor);
        if let Value::Scalar {
            kind: Scalar::Int(_),
            text,
        } = &self.value
        {
            // serde's wording for integers lacks the value; add it.
            err.message = err
                .message
                .replacen("integer", &format!("integer `{text}`"), 1);
        }
        err.at(self.pos)
    }

    fn int<V: Visitor<'de>>(&'de self, visitor: V) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Scalar {
                kind: Scalar::Int(i),
                ..
            } => {
                if let Ok(v) = u64::try_from(*i) {
                    visitor.visit_u64(v)
                } else if let Ok(v) = i64::try_from(*i) {
                    visitor.visit_i64(v)
                } else {
                    visitor.visit_i128(*i)
                }
            }
            _ => Err(self.invalid(&visitor)),
        }
    }
}

macro_rules! forward_int {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
            self.int(visitor).map_err(|e: NodeError| e.at(self.pos))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &'de Node {
    type Error = NodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        let result = match &self.value {
            Value::Null => visitor.visit_unit(),
            Value::Scalar {
                kind: Scalar::Bool(b),
                ..
            } => visitor.visit_bool(*b),
            Value::Scalar {
                kind: Scalar::Int(_),
                ..
            } => self.int(visitor),
            Value::Scalar {
                kind: Scalar::Float(f),
                ..
            } => visitor.visit_f64(*f),
            Value::Scalar {
                kind: Scalar::Str,
                text,
            } => visitor.visit_borrowed_str(text),
            Value::Seq(items) => visitor.visit_seq(SeqNodes {
                items: items.iter().enumerate(),
            }),
            Value::Map(entries) => visitor.visit_map(MapNodes {
                entries: entries.iter(),
                value: None,
            }),
        };
        result.map_err(|e: NodeError| e.at(self.pos))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Scalar {
                kind: Scalar::Bool(b),
                ..
            } => visitor
                .visit_bool(*b)
                .map_err(|e: NodeError| e.at(self.pos)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    forward_int! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        let result = match &self.value {
            Value::Scalar {
                kind: Scalar::Float(f),
                ..
            } => visitor.visit_f64(*f),
            Value::Scalar {
                kind: Scalar::Int(i),
                ..
            } => visitor.visit_f64(*i as f64),
            _ => return Err(self.invalid(&visitor)),
        };
        result.map_err(|e: NodeError| e.at(self.pos))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        self.deserialize_str(visitor)
    }

    /// Any scalar reads as its source text: env values like `8080` or `true`
    /// are strings to a child process.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Scalar { text, .. } => visitor
                .visit_borrowed_str(text)
                .map_err(|e: NodeError| e.at(self.pos)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        Err(self.invalid(&visitor))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
        .map_err(|e: NodeError| e.at(self.pos))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Null => visitor.visit_unit().map_err(|e: NodeError| e.at(self.pos)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, NodeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, NodeError> {
        visitor
            .visit_newtype_struct(self)
            .map_err(|e: NodeError| e.at(self.pos))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Seq(items) => visitor
                .visit_seq(SeqNodes {
                    items: items.iter().enumerate(),
                })
                .map_err(|e: NodeError| e.at(self.pos)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, NodeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, NodeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Map(entries) => visitor
                .visit_map(MapNodes {
                    entries: entries.iter(),
                    value: None,
                })
                .map_err(|e: NodeError| e.at(self.pos)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, NodeError> {
        if name == AT_MARKER {
            return visitor.visit_map(AtAccess {
                node: self,
                next: 0,
            });
        }
        if !matches!(self.value, Value::Map(_)) {
            // serde's own wording would name the Rust struct; name the fields.
            let fields = fields
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let expected = format!("a mapping with {fields}");
            let err = <NodeError as de::Error>::invalid_type(unexpected(self), &expected.as_str());
            return Err(err.at(self.pos));
        }
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, NodeError> {
        match &self.value {
            Value::Scalar { text, .. } => visitor
                .visit_enum(text.as_str().into_deserializer())
                .map_err(|e: NodeError| e.at(self.pos)),
            _ => Err(self.invalid(&visitor)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NodeError> {
        visitor.visit_unit()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[test]
    fn an_unclosed_bracket_is_blamed_where_it_was_opened() {
        let cases: &[(&str, &str, Pos, &str)] = &[
            (
                "unclosed list",
                "version: 1\nagents:\n  a:\n    command: [sleep, 1\n    env: { X: y }\n",
                Pos::new(4, 14),
                "`[` is never closed (the parser noticed at 5:8: ",
            ),
            (
                "unclosed map",
                "version: 1\nagents:\n  a:\n    command: [sleep]\n    env: {X: y\n  b:\n    command: [true]\n",
                Pos::new(5, 10),
                "`{` is never closed (the parser noticed at 6:",
            ),
        ];
        for (what, source, pos, starts) in cases {
            let err = parse(source).unwrap_err();
            assert_eq!(err.pos, *pos, "{what}: {}", err.message);
            assert!(err.message.starts_with(starts), "{what}: {}", err.message);
        }
        // Brackets in quotes, comments and plain words are not openers; an
        // error on the opener's own line stays where the parser found it.
        for (source, at) in [
            ("a: \"[x\"\nb: : c\n", Pos::new(2, 4)),
            ("a: x # [\nb: : c\n", Pos::new(2, 4)),
            ("a: echo [x\nb: : c\n", Pos::new(2, 4)),
            ("a: [x, : ]\n", Pos::new(1, 8)),
        ] {
            assert_eq!(unclosed_flow_before(source, at), None, "{source:?}");
        }
        assert_eq!(
            unclosed_flow_before("a: [x, {y: [1]}\nb: 2\n", Pos::new(2, 2)),
            Some((Pos::new(1, 4), '['))
        );
    }

    #[allow(dead_code)] // read through Debug
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Top {
        name: String,
        inner: Option<Inner>,
        env: Option<BTreeMap<String, String>>,
        list: Option<Vec<u32>>,
    }

    #[allow(dead_code)] // read through Debug
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        count: Option<u32>,
        flag: Option<bool>,
        deeper: Option<Deeper>,
    }

    #[allow(dead_code)] // read through Debug
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Deeper {
        a: Option<u32>,
        b: Option<u32>,
    }

    /// Every error as `line:col path: message`, and the fields `rest` kept.
    fn check(yaml: &str) -> (Vec<String>, Option<String>) {
        let node = parse(yaml).unwrap();
        match from_node_all::<Top>(&node) {
            Ok(top) => (Vec::new(), Some(format!("{top:?}"))),
            Err(partial) => (
                partial
                    .errors
                    .iter()
                    .map(|e| {
                        let pos = e.pos.unwrap_or_default();
                        format!("{}:{} {}", pos.line, pos.column, e.describe())
                    })
                    .collect(),
                partial.rest.map(|r| format!("{r:?}")),
            ),
        }
    }

    /// (what, yaml, errors, what `rest` holds)
    type Case = (
        &'static str,
        &'static str,
        &'static [&'static str],
        Option<&'static str>,
    );

    #[test]
    fn every_broken_leaf_is_reported_and_siblings_kept() {
        let cases: &[Case] = &[
            (
                "valid",
                "name: x\ninner: {count: 1}\n",
                &[],
                Some(
                    r#"Top { name: "x", inner: Some(Inner { count: Some(1), flag: None, deeper: None }), env: None, list: None }"#,
                ),
            ),
            (
                "two broken fields of one nested section",
                "name: x\ninner: {count: nope, flag: 3, deeper: {a: 1}}\n",
                &[
                    "2:16 `inner.count`: invalid type: string \"nope\", expected u32",
                    "2:28 `inner.flag`: invalid type: integer `3`, expected a boolean",
                ],
                Some(
                    r#"Top { name: "x", inner: Some(Inner { count: None, flag: None, deeper: Some(Deeper { a: Some(1), b: None }) }), env: None, list: None }"#,
                ),
            ),
            (
                "an unknown field next to a broken one",
                "name: x\ninner:\n  bogus: 1\n  count: -1\n",
                &[
                    "3:3 `inner`: unknown field `bogus`, expected one of `count`, `flag`, `deeper`",
                    "4:10 `inner.count`: invalid value: integer `-1`, expected u32",
                ],
                Some(
                    r#"Top { name: "x", inner: Some(Inner { count: None, flag: None, deeper: None }), env: None, list: None }"#,
                ),
            ),
            (
                "two levels down",
                "name: x\ninner: {deeper: {a: x, b: q}, flag: true}\n",
                &[
                    "2:21 `inner.deeper.a`: invalid type: string \"x\", expected u32",
                    "2:27 `inner.deeper.b`: invalid type: string \"q\", expected u32",
                ],
                Some(
                    r#"Top { name: "x", inner: Some(Inner { count: None, flag: Some(true), deeper: Some(Deeper { a: None, b: None }) }), env: None, list: None }"#,
                ),
            ),
            (
                "map entries: a broken value keeps its well-formed siblings",
                "name: x\nenv: {1X: y, OK: {a: 1}, Z: [1]}\n",
                &[
                    "2:18 `env.OK`: invalid type: map, expected a string",
                    "2:29 `env.Z`: invalid type: sequence, expected a string",
                ],
                Some(r#"Top { name: "x", inner: None, env: Some({"1X": "y"}), list: None }"#),
            ),
            (
                "a missing required field and a broken nested one",
                "inner: {count: nope, flag: 3}\n",
                &[
                    "1:16 `inner.count`: invalid type: string \"nope\", expected u32",
                    "1:28 `inner.flag`: invalid type: integer `3`, expected a boolean",
                ],
                None,
            ),
            (
                "a section of the wrong kind is one error",
                "name: x\ninner: [1, 2]\n",
                &[
                    "2:8 `inner`: invalid type: sequence, expected a mapping with `count`, `flag`, `deeper`",
                ],
                Some(r#"Top { name: "x", inner: None, env: None, list: None }"#),
            ),
            (
                "lists stay whole: their first error",
                "name: x\nlist: [1, a, b]\n",
                &["2:11 `list[1]`: invalid type: string \"a\", expected u32"],
                Some(r#"Top { name: "x", inner: None, env: None, list: None }"#),
            ),
        ];
        for (what, yaml, errors, rest) in cases {
            let (got_errors, got_rest) = check(yaml);
            assert_eq!(got_errors, *errors, "{what}");
            assert_eq!(got_rest.as_deref(), *rest, "{what}");
        }
    }
}
