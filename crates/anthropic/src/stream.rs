//! Streamed chat chunks → Anthropic stream events.

use std::collections::VecDeque;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::error::TranslateError;
use crate::response::{StopReason, Usage};
use crate::sse::write_event;
use crate::upstream::{self, Completion, FunctionIn, UsageIn};

/// Turns an upstream's streamed chat chunks into the events Anthropic
/// clients parse, one chunk at a time.
///
/// Feed it each SSE `data:` payload ([`push`](Self::push)) and call
/// [`finish`](Self::finish) at `data: [DONE]` or the end of the stream
/// (pushing `[DONE]` does the same). Each call returns the bytes to write to
/// the client right away: complete `event: <type>\ndata: <json>\n\n` events,
/// possibly none.
///
/// # The events
///
/// - The first chunk (or `finish`, for an empty stream) starts the message:
///   `message_start` (with `usage.input_tokens` from that chunk's usage, else
///   [`with_input_tokens`](Self::with_input_tokens), else 0), then `ping`.
/// - Text opens a `text` content block; tool call `k` (however its pieces
///   arrive: id and name first, then `index` and argument fragments) opens a
///   `tool_use` block whose argument fragments are sent as `input_json_delta`
///   `partial_json`. Indexes count from 0 in the order blocks open.
/// - One block is open at a time, as Anthropic sends them: a block stops
///   (`content_block_stop`) when the next one starts or at the end.
/// - Whitespace-only text does not open a block (models send `"\n\n"`
///   around tool calls): it is held and sent before the text that follows,
///   or never if none does.
/// - `finish` stops the open block, then sends `message_delta` (the stop
///   reason, `stop_sequence`, `usage.output_tokens`, and `input_tokens` when
///   the upstream reported usage) and `message_stop`. Usage from any chunk is
///   used, including the last one with empty `choices` that
///   `stream_options.include_usage` adds; without any, `output_tokens` is a
///   local estimate (a token per 4 bytes of text and arguments).
///
/// # Parallel tool calls
///
/// Some servers interleave the argument fragments of parallel calls. Since
/// blocks are sent one after another, a block that is not the open one waits
/// (its pieces buffered) until the open tool call's arguments form a complete
/// JSON value; text and calls that arrive after a finished call, or after
/// text, start at once. A call whose name has not arrived cannot start yet and
/// holds back the blocks after it. At the end everything still waiting is
/// sent in order (a call that never got a name with an empty one).
///
/// # Odd input
///
/// It never panics. Empty payloads, chunks without choices, `null` deltas,
/// choices other than index 0, a tool call `index` that jumps, role-only and
/// empty deltas send nothing (beyond starting the message). A payload that is
/// not a JSON chunk is [`TranslateError::InvalidChunk`] and an `error` object
/// [`TranslateError::Upstream`]; either leaves the translator as it was, for
/// the caller to skip the chunk or to end the stream with
/// [`error_event`](crate::error_event). Argument fragments for a call whose
/// block has already stopped cannot be sent; they are counted
/// ([`late_fragments`](Self::late_fragments)). Chunks after the end are
/// ignored.
///
/// ```
/// use proxypal_anthropic::StreamTranslator;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut stream = StreamTranslator::new("claude-haiku-4-5");
/// let first = stream.push(br#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#)?;
/// assert!(first.starts_with(b"event: message_start\n"));
/// stream.push(br#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#)?;
/// let end = stream.push(b"[DONE]")?;
/// assert!(end.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct StreamTranslator {
    model: String,
    input_tokens: Option<u64>,
    message_id: String,
    started: bool,
    finished: bool,
    next_index: usize,
    active: Option<Active>,
    queue: VecDeque<Slot>,
    calls: Vec<Call>,
    tool_blocks: usize,
    finish_reason: Option<String>,
    matched_stop: Option<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    streamed_bytes: u64,
    late_fragments: u64,
    /// Whitespace-only text not sent yet.
    held_space: String,
}

/// The open content block.
#[derive(Debug, Clone, Copy)]
enum Active {
    Text { index: usize },
    Call { call: usize },
}

/// A block waiting for the open one to finish.
#[derive(Debug, Clone)]
enum Slot {
    Text(String),
    Call(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    Waiting,
    Open,
    Stopped,
}

/// One upstream tool call.
#[derive(Debug, Clone)]
struct Call {
    /// The upstream's `index`.
    key: u64,
    id: String,
    name: Option<String>,
    /// Its content block's index, once open.
    index: usize,
    state: CallState,
    /// Argument fragments received while waiting.
    waiting_args: String,
    scan: JsonScan,
}

impl StreamTranslator {
    /// A translator for an answer shown to the client as `model_shown`.
    pub fn new(model_shown: impl Into<String>) -> Self {
        Self {
            model: model_shown.into(),
            input_tokens: None,
            message_id: String::new(),
            started: false,
            finished: false,
            next_index: 0,
            active: None,
            queue: VecDeque::new(),
            calls: Vec::new(),
            tool_blocks: 0,
            finish_reason: None,
            matched_stop: None,
            prompt_tokens: None,
            completion_tokens: None,
            streamed_bytes: 0,
            late_fragments: 0,
            held_space: String::new(),
        }
    }

    /// The `input_tokens` for `message_start` when the first chunk carries no
    /// usage (which is usual): the gateway's estimate
    /// ([`estimate_tokens`](crate::estimate_tokens)) or a count it knows.
    pub fn with_input_tokens(mut self, input_tokens: u64) -> Self {
        self.input_tokens = Some(input_tokens);
        self
    }

    /// Translates one SSE `data:` payload (without `data:`; surrounding
    /// whitespace and a stray `data:` prefix are tolerated; `[DONE]` is
    /// [`finish`](Self::finish)) into the events to send now.
    pub fn push(&mut self, data: &[u8]) -> Result<Bytes, TranslateError> {
        let mut out = Vec::new();
        self.push_into(data, &mut out)?;
        Ok(Bytes::from(out))
    }

    /// [`push`](Self::push) appending to a caller's buffer. On error nothing
    /// is appended and the translator is unchanged.
    pub fn push_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), TranslateError> {
        if self.finished {
            return Ok(());
        }
        let mut data = data.trim_ascii();
        if let Some(rest) = data.strip_prefix(b"data:") {
            data = rest.trim_ascii();
        }
        if data.is_empty() {
            return Ok(());
        }
        if data == b"[DONE]" {
            self.finish_into(out);
            return Ok(());
        }
        let chunk: Completion = serde_json::from_slice(data)
            .map_err(|e| TranslateError::InvalidChunk { reason: e.to_string() })?;
        if let Some(error) = chunk.upstream_error() {
            return Err(error);
        }
        self.start(chunk.id.as_deref(), chunk.usage, out);
        if let Some(usage) = chunk.usage {
            self.prompt_tokens = usage.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = usage.completion_tokens.or(self.completion_tokens);
        }
        let Some(choice) = chunk.first_choice() else { return Ok(()) };
        if let Some(delta) = choice.delta.as_ref().or(choice.message.as_ref()) {
            match &delta.content {
                Some(Value::String(text)) => self.text(text, out),
                Some(content @ Value::Array(_)) => {
                    let mut text = String::new();
                    upstream::content_text(content, &mut text);
                    self.text(&text, out);
                }
                _ => {}
            }
            if let Some(refusal) = &delta.refusal {
                self.text(refusal, out);
            }
            for call in delta.tool_calls.iter().flatten() {
                self.call_piece(call.index, call.id.as_deref(), call.function.as_ref(), out);
            }
            if let Some(function) = &delta.function_call {
                // The legacy single call: a key no `tool_calls` index uses.
                self.call_piece(Some(u64::MAX), None, Some(function), out);
            }
        }
        if let Some(reason) = choice.finish_reason.as_deref().filter(|r| !r.is_empty()) {
            self.finish_reason = Some(reason.to_owned());
        }
        if let Some(matched) = choice.matched_stop() {
            self.matched_stop = Some(matched.to_owned());
        }
        Ok(())
    }

    /// Ends the message: the events to send at `data: [DONE]` or when the
    /// upstream stream ends without it. Idempotent: later calls send nothing.
    pub fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        self.finish_into(&mut out);
        Bytes::from(out)
    }

    /// [`finish`](Self::finish) appending to a caller's buffer.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.start(None, None, out);
        loop {
            self.stop_active(out);
            let Some(slot) = self.queue.pop_front() else { break };
            if let Slot::Call(call) = slot {
                if let Some(call) = self.calls.get_mut(call) {
                    call.name.get_or_insert_with(String::new);
                }
            }
            self.open(slot, out);
        }
        let reason = self.stop_reason();
        let stop_sequence = match reason {
            StopReason::StopSequence => self.matched_stop.as_deref(),
            _ => None,
        };
        let usage = self.usage();
        let event = Event::MessageDelta {
            delta: StopDelta { stop_reason: reason.as_str(), stop_sequence },
            usage: DeltaUsage { input_tokens: self.prompt_tokens, output_tokens: usage.output_tokens },
        };
        event.write(out);
        Event::MessageStop.write(out);
        self.finished = true;
    }

    /// Whether the message has ended (`message_stop` was returned).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The upstream's last `finish_reason`, if it sent one: `None` at the end
    /// means the upstream stream was cut rather than finished.
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    /// The stop reason the message ends (or would end) with.
    pub fn stop_reason(&self) -> StopReason {
        upstream::stop_reason(
            self.finish_reason.as_deref(),
            self.matched_stop.as_deref(),
            self.tool_blocks > 0,
        )
    }

    /// The token counts: the upstream's when it reported them; else the
    /// input count given to [`with_input_tokens`](Self::with_input_tokens)
    /// (or 0) and the estimate from the bytes streamed so far.
    pub fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens.or(self.input_tokens).unwrap_or(0),
            output_tokens: self.completion_tokens.unwrap_or(self.streamed_bytes.div_ceil(4)),
        }
    }

    /// Whether the upstream reported usage in some chunk.
    pub fn has_upstream_usage(&self) -> bool {
        self.prompt_tokens.is_some() || self.completion_tokens.is_some()
    }

    /// Argument fragments that arrived for a tool call whose block had
    /// already stopped, and so were not sent.
    pub fn late_fragments(&self) -> u64 {
        self.late_fragments
    }

    fn start(&mut self, id: Option<&str>, usage: Option<UsageIn>, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        self.message_id = upstream::message_id(id);
        let input_tokens = usage.and_then(|u| u.prompt_tokens).or(self.input_tokens).unwrap_or(0);
        let event = Event::MessageStart {
            message: StartMessage {
                id: &self.message_id,
                role: "assistant",
                model: &self.model,
                content: &[],
                stop_reason: None,
                stop_sequence: None,
                usage: Usage { input_tokens, output_tokens: 0 },
            },
        };
        event.write(out);
        Event::Ping.write(out);
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        if text.is_empty() {
            return;
        }
        self.streamed_bytes += text.len() as u64;
        let text_block_to_extend = match self.queue.back() {
            Some(slot) => matches!(slot, Slot::Text(_)),
            None => matches!(self.active, Some(Active::Text { .. })),
        };
        if !text_block_to_extend && text.trim().is_empty() {
            // Not worth a block of its own (models send "\n\n" around tool
            // calls): kept for the text that may follow.
            self.held_space.push_str(text);
            return;
        }
        let joined;
        let text = if self.held_space.is_empty() {
            text
        } else {
            joined = std::mem::take(&mut self.held_space) + text;
            joined.as_str()
        };
        if !self.queue.is_empty() {
            match self.queue.back_mut() {
                Some(Slot::Text(waiting)) => waiting.push_str(text),
                _ => self.queue.push_back(Slot::Text(text.to_owned())),
            }
            self.advance(out);
            return;
        }
        match self.active {
            Some(Active::Text { index }) => Event::text_delta(index, text).write(out),
            Some(Active::Call { call }) if !self.call_is_done(call) => {
                self.queue.push_back(Slot::Text(text.to_owned()));
            }
            _ => {
                self.stop_active(out);
                self.open_text(text, out);
            }
        }
    }

    fn call_piece(
        &mut self,
        key: Option<u64>,
        id: Option<&str>,
        function: Option<&FunctionIn>,
        out: &mut Vec<u8>,
    ) {
        let id = id.filter(|id| !id.is_empty());
        let name = function.and_then(|f| f.name.as_deref()).filter(|n| !n.is_empty());
        let call = self.find_call(key, id, name.is_some());
        let Some(c) = self.calls.get_mut(call) else { return };
        if c.name.is_none() {
            c.name = name.map(str::to_owned);
        }
        let fragment = match function.and_then(|f| f.arguments.as_ref()) {
            Some(Value::String(s)) => Some(std::borrow::Cow::Borrowed(s.as_str())),
            // A server that sends the arguments whole, as an object.
            Some(Value::Object(o)) if !o.is_empty() => {
                Some(std::borrow::Cow::Owned(Value::Object(o.clone()).to_string()))
            }
            _ => None,
        };
        if let Some(fragment) = fragment.filter(|f| !f.is_empty()) {
            match c.state {
                CallState::Open => {
                    c.scan.feed(&fragment);
                    self.streamed_bytes += fragment.len() as u64;
                    Event::json_delta(c.index, &fragment).write(out);
                }
                CallState::Waiting => {
                    c.scan.feed(&fragment);
                    self.streamed_bytes += fragment.len() as u64;
                    c.waiting_args.push_str(&fragment);
                }
                CallState::Stopped => self.late_fragments += 1,
            }
        }
        self.advance(out);
    }

    /// The call a piece belongs to, made (and queued) when new. A piece
    /// belongs to the last call with its `index`, unless it brings another id
    /// and a name (servers that reuse index 0 for every call); a piece
    /// without an `index` to the call with its id, else the last call —
    /// unless it names a function while the last call has its name and
    /// whole arguments already (a server that sends neither: a new call).
    fn find_call(&mut self, key: Option<u64>, id: Option<&str>, has_name: bool) -> usize {
        let found = match key {
            Some(key) => self.calls.iter().rposition(|c| c.key == key).filter(|&i| {
                let differs = id.is_some_and(|id| self.calls[i].id != id);
                !(differs && has_name)
            }),
            None => match id {
                Some(id) => self.calls.iter().rposition(|c| c.id == id),
                None => self.calls.len().checked_sub(1).filter(|&i| {
                    let last = &self.calls[i];
                    !(has_name && last.name.is_some() && last.scan.complete())
                }),
            },
        };
        if let Some(found) = found {
            return found;
        }
        let key =
            key.unwrap_or_else(|| self.calls.iter().map(|c| c.key.saturating_add(1)).max().unwrap_or(0));
        let n = self.calls.len();
        let id = id.map_or_else(|| upstream::tool_use_id(&self.message_id, n), str::to_owned);
        self.calls.push(Call {
            key,
            id,
            name: None,
            index: 0,
            state: CallState::Waiting,
            waiting_args: String::new(),
            scan: JsonScan::default(),
        });
        self.queue.push_back(Slot::Call(n));
        n
    }

    fn call_is_done(&self, call: usize) -> bool {
        self.calls.get(call).is_none_or(|c| c.scan.complete())
    }

    /// Opens waiting blocks while the open one may stop.
    fn advance(&mut self, out: &mut Vec<u8>) {
        while let Some(front) = self.queue.front() {
            if let Slot::Call(call) = front {
                if self.calls.get(*call).is_some_and(|c| c.name.is_none()) {
                    break;
                }
            }
            if let Some(Active::Call { call }) = self.active {
                if !self.call_is_done(call) {
                    break;
                }
            }
            self.stop_active(out);
            let Some(slot) = self.queue.pop_front() else { break };
            self.open(slot, out);
        }
    }

    fn stop_active(&mut self, out: &mut Vec<u8>) {
        let index = match self.active.take() {
            None => return,
            Some(Active::Text { index }) => index,
            Some(Active::Call { call }) => match self.calls.get_mut(call) {
                Some(c) => {
                    c.state = CallState::Stopped;
                    c.index
                }
                None => return,
            },
        };
        Event::ContentBlockStop { index }.write(out);
    }

    fn open(&mut self, slot: Slot, out: &mut Vec<u8>) {
        match slot {
            Slot::Text(text) => self.open_text(&text, out),
            Slot::Call(call) => {
                let index = self.next_index;
                let Some(c) = self.calls.get_mut(call) else { return };
                self.next_index += 1;
                self.tool_blocks += 1;
                c.index = index;
                c.state = CallState::Open;
                let block =
                    StartBlock::ToolUse { id: &c.id, name: c.name.as_deref().unwrap_or(""), input: Empty {} };
                Event::ContentBlockStart { index, content_block: block }.write(out);
                if !c.waiting_args.is_empty() {
                    Event::json_delta(index, &c.waiting_args).write(out);
                    c.waiting_args = String::new();
                }
                self.active = Some(Active::Call { call });
            }
        }
    }

    fn open_text(&mut self, text: &str, out: &mut Vec<u8>) {
        let index = self.next_index;
        self.next_index += 1;
        Event::ContentBlockStart { index, content_block: StartBlock::Text { text: "" } }.write(out);
        if !text.is_empty() {
            Event::text_delta(index, text).write(out);
        }
        self.active = Some(Active::Text { index });
    }
}

/// Tracks whether streamed tool arguments form a complete JSON object (or
/// array) yet, without parsing them: bracket depth outside strings.
#[derive(Debug, Clone, Copy, Default)]
struct JsonScan {
    depth: u32,
    in_string: bool,
    escaped: bool,
    closed: bool,
}

impl JsonScan {
    fn feed(&mut self, fragment: &str) {
        for b in fragment.bytes() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 0 {
                        self.closed = false;
                    }
                }
                b'{' | b'[' => {
                    self.depth = self.depth.saturating_add(1);
                    self.closed = false;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.closed = self.depth == 0;
                }
                b' ' | b'\t' | b'\n' | b'\r' => {}
                _ if self.depth == 0 => self.closed = false,
                _ => {}
            }
        }
    }

    fn complete(&self) -> bool {
        self.closed && self.depth == 0 && !self.in_string
    }
}

/// The events, as Anthropic serializes them (`type` first).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart { message: StartMessage<'a> },
    Ping,
    ContentBlockStart { index: usize, content_block: StartBlock<'a> },
    ContentBlockDelta { index: usize, delta: BlockDelta<'a> },
    ContentBlockStop { index: usize },
    MessageDelta { delta: StopDelta<'a>, usage: DeltaUsage },
    MessageStop,
}

impl<'a> Event<'a> {
    fn text_delta(index: usize, text: &'a str) -> Self {
        Event::ContentBlockDelta { index, delta: BlockDelta::TextDelta { text } }
    }

    fn json_delta(index: usize, partial_json: &'a str) -> Self {
        Event::ContentBlockDelta { index, delta: BlockDelta::InputJsonDelta { partial_json } }
    }

    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::Ping => "ping",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        write_event(out, self.name(), self);
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename = "message")]
struct StartMessage<'a> {
    id: &'a str,
    role: &'static str,
    model: &'a str,
    content: &'static [Value],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: Usage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock<'a> {
    Text { text: &'a str },
    ToolUse { id: &'a str, name: &'a str, input: Empty },
}

/// `{}`.
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Serialize)]
struct StopDelta<'a> {
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
}

#[derive(Serialize)]
struct DeltaUsage {
    #[serde(skip_serializing_if = "Option::is_none")]
    input_tokens: Option<u64>,
    output_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_scan_sees_complete_values() {
        let table = [
            ("", false),
            ("{", false),
            ("{}", true),
            (r#"{"a":"}"}"#, true),
            (r#"{"a":"\"}"#, false),
            (r#"{"a":"\\"}"#, true),
            (r#"{"a":[1,{"b":2}]}"#, true),
            (r#"{"a":[1,{"b":2}]"#, false),
            ("{} ", true),
            ("{}x", false),
            (r#""{}""#, false),
            ("[1]", true),
        ];
        for (text, complete) in table {
            let mut scan = JsonScan::default();
            scan.feed(text);
            assert_eq!(scan.complete(), complete, "{text}");
            // Fed one byte at a time, the same.
            let mut scan = JsonScan::default();
            for i in 0..text.len() {
                scan.feed(&text[i..i + 1]);
            }
            assert_eq!(scan.complete(), complete, "{text} bytewise");
        }
    }
}
