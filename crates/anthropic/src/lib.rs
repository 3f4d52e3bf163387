//! ProxyPal's Anthropic Messages API translation: Claude Code, the Anthropic
//! SDKs and any Messages client talking to OpenAI-compatible upstreams.
//!
//! This crate is pure translation, with no HTTP and no I/O in it; the gateway
//! composes it (`POST /v1/messages`, `POST /v1/messages/count_tokens`):
//!
//! - [`MessagesRequest`] reads a Messages body (unknown fields kept aside in
//!   [`MessagesRequest::extra`], unknown block types kept as
//!   [`ContentBlock::Other`]).
//! - [`to_chat`] turns it into a [`ChatRequest`] for `/v1/chat/completions`,
//!   per [`Options`] (what the upstream accepts), and lists what it could not
//!   carry ([`Dropped`]).
//! - [`from_chat`] turns a chat completion into a [`MessageResponse`].
//! - [`StreamTranslator`] turns streamed chat chunks, one `data:` payload at
//!   a time, into Anthropic's events, ready to write (`event: …\ndata:
//!   …\n\n`); [`error_event`] ends a started stream with an error.
//! - [`ApiError`] is an error in Anthropic's shape, from a status
//!   ([`ApiError::from_status`]) or an upstream's OpenAI-shaped error body
//!   ([`ApiError::from_openai_body`]).
//! - [`estimate_tokens`] answers `count_tokens` locally.
//!
//! # What does not cross over
//!
//! - `cache_control` is ignored (chat upstreams cache prefixes, if at all, by
//!   themselves); `thinking` blocks in the history are dropped and reported;
//!   Anthropic's own tools (`web_search_…`, `bash_…`) are dropped and
//!   reported; `document`, `search_result` and other block types chat
//!   completions cannot carry are refused with an error that names them.
//! - Upstream reasoning text (`reasoning_content`) is not turned into
//!   `thinking` blocks: Anthropic clients would send them back with a
//!   signature no upstream can check.
//! - JSON objects (tool inputs and schemas) come out with their keys in
//!   alphabetical order (`serde_json` without `preserve_order`): the same
//!   request always gives the same bytes.
//! - Only the first choice of an answer is read (`n` is never set).
//!
//! ```
//! use proxypal_anthropic::{
//!     MessagesRequest, Options, ResponseBlock, StopReason, StreamTranslator, from_chat, to_chat,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A client's request, with a tool round trip in its history.
//! let body = br#"{
//!   "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": true,
//!   "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
//!   "tools": [{"name": "read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}],
//!   "messages": [
//!     {"role": "user", "content": "What is in a.txt?"},
//!     {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.txt"}}]},
//!     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "hello"}]}
//!   ],
//!   "top_k": 5
//! }"#;
//! let request = MessagesRequest::from_slice(body)?;
//! let translation = to_chat(request, &Options::new().with_stream_usage(true))?;
//! let upstream_body = serde_json::to_vec(&translation.chat)?;
//! assert!(upstream_body.starts_with(br#"{"model":"claude-sonnet-4-5","messages":[{"role":"system","content":"You are terse."}"#));
//! assert_eq!(translation.dropped.iter().map(|d| d.to_string()).collect::<Vec<_>>(), ["top_k"]);
//!
//! // A plain answer back.
//! let answer = br#"{"id":"chatcmpl-7","choices":[{"index":0,"message":{"role":"assistant","content":"It says hello."},
//!                   "finish_reason":"stop"}],"usage":{"prompt_tokens":40,"completion_tokens":5}}"#;
//! let message = from_chat(answer, "claude-sonnet-4-5")?;
//! assert_eq!(message.id, "msg_7");
//! assert_eq!(message.stop_reason, Some(StopReason::EndTurn));
//! assert!(matches!(&message.content[..], [ResponseBlock::Text(t)] if t.text == "It says hello."));
//!
//! // A streamed one, chunk by chunk.
//! let mut stream = StreamTranslator::new("claude-sonnet-4-5");
//! let mut sent = Vec::new();
//! for data in [
//!     &br#"{"id":"chatcmpl-8","choices":[{"index":0,"delta":{"role":"assistant","content":"It says"}}]}"#[..],
//!     br#"{"id":"chatcmpl-8","choices":[{"index":0,"delta":{"content":" hello."},"finish_reason":"stop"}]}"#,
//!     br#"{"id":"chatcmpl-8","choices":[],"usage":{"prompt_tokens":40,"completion_tokens":5}}"#,
//!     b"[DONE]",
//! ] {
//!     sent.extend_from_slice(&stream.push(data)?);
//! }
//! let events: Vec<&str> = std::str::from_utf8(&sent)?
//!     .lines()
//!     .filter_map(|line| line.strip_prefix("event: "))
//!     .collect();
//! assert_eq!(
//!     events,
//!     ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
//!      "content_block_stop", "message_delta", "message_stop"]
//! );
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod chat;
mod error;
mod request;
mod response;
mod sse;
mod stream;
mod tokens;
mod translate;
mod upstream;

pub use chat::{
    ChatContent, ChatMessage, ChatPart, ChatRequest, ChatTool, ChatToolCall, ChatToolChoice, FunctionCall,
    FunctionDef, FunctionName, ImageUrl, NamedToolChoice, StreamOptions, ToolChoiceMode,
};
pub use error::{ApiError, ErrorKind, TranslateError, error_event};
pub use request::{
    ContentBlock, ImageBlock, ImageSource, Message, MessageContent, MessagesRequest, Role, System, TextBlock,
    Tool, ToolChoice, ToolResultBlock, ToolUseBlock,
};
pub use response::{AssistantRole, MessageResponse, ResponseBlock, StopReason, Usage, from_chat};
pub use stream::StreamTranslator;
pub use tokens::{
    BYTES_PER_TOKEN, TOKENS_PER_IMAGE, TOKENS_PER_MESSAGE, TOKENS_PER_TOOL, TokenCount, estimate_tokens,
};
pub use translate::{Dropped, Options, TEXT_JOINER, TOOL_ERROR_PREFIX, Translation, to_chat};
