//! Messages request → chat-completions request.

use std::fmt;

use serde_json::{Map, Value};

use crate::chat::{
    ChatContent, ChatMessage, ChatPart, ChatRequest, ChatTool, ChatToolCall, ChatToolChoice, FunctionCall,
    FunctionDef, FunctionName, ImageUrl, NamedToolChoice, StreamOptions, ToolChoiceMode,
};
use crate::error::TranslateError;
use crate::request::{
    ContentBlock, ImageSource, Message, MessageContent, MessagesRequest, Role, Tool, ToolChoice,
    ToolResultBlock,
};

/// What joins several text blocks that become one chat string (system
/// blocks, a user's or assistant's text blocks, a tool result's text blocks):
/// a blank line, so paragraphs stay paragraphs.
pub const TEXT_JOINER: &str = "\n\n";

/// What starts a `tool` message whose `tool_result` had `is_error: true`
/// (chat completions has no error flag, so the model reads it); an empty
/// failed result becomes just `Error`.
pub const TOOL_ERROR_PREFIX: &str = "Error: ";

/// What the target upstream accepts beyond plain chat completions. Anything
/// it does not accept is left out of the chat request and listed in
/// [`Translation::dropped`].
///
/// The default suits any OpenAI-compatible upstream: only
/// `parallel_tool_calls` is on.
///
/// ```
/// let options = proxypal_anthropic::Options::new().with_stream_usage(true).with_top_k(true);
/// assert!(options.stream_usage && options.top_k && options.parallel_tool_calls);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// A stream asks for usage (`stream_options: {"include_usage": true}`),
    /// so `message_delta` carries the upstream's token counts. Off by
    /// default: some upstreams reject the field or hang on it (NVIDIA, per
    /// model), as the gateway's `stream_usage` setting says.
    pub stream_usage: bool,
    /// `top_k` is passed through (vLLM-based servers such as NVIDIA NIM
    /// accept it as an extension). Off by default.
    pub top_k: bool,
    /// `disable_parallel_tool_use` becomes `parallel_tool_calls: false`. On
    /// by default; off for upstreams that reject the field (Cerebras).
    pub parallel_tool_calls: bool,
    /// `metadata.user_id` becomes `user`. Off by default.
    pub user: bool,
    /// `thinking` becomes `reasoning_effort` (`budget_tokens` below 4,096:
    /// `low`, below 16,384: `medium`, else `high`). Off by default: only
    /// reasoning models accept it.
    pub reasoning_effort: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self::new()
    }
}

impl Options {
    /// The default: plain chat completions plus `parallel_tool_calls`.
    pub const fn new() -> Self {
        Self {
            stream_usage: false,
            top_k: false,
            parallel_tool_calls: true,
            user: false,
            reasoning_effort: false,
        }
    }

    /// Sets [`Options::stream_usage`].
    pub const fn with_stream_usage(mut self, on: bool) -> Self {
        self.stream_usage = on;
        self
    }

    /// Sets [`Options::top_k`].
    pub const fn with_top_k(mut self, on: bool) -> Self {
        self.top_k = on;
        self
    }

    /// Sets [`Options::parallel_tool_calls`].
    pub const fn with_parallel_tool_calls(mut self, on: bool) -> Self {
        self.parallel_tool_calls = on;
        self
    }

    /// Sets [`Options::user`].
    pub const fn with_user(mut self, on: bool) -> Self {
        self.user = on;
        self
    }

    /// Sets [`Options::reasoning_effort`].
    pub const fn with_reasoning_effort(mut self, on: bool) -> Self {
        self.reasoning_effort = on;
        self
    }
}

/// Something in the Messages request that the chat request does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dropped {
    /// A top-level field (`top_k`, `metadata`, `thinking`, an unknown field)
    /// or part of one (`tool_choice.disable_parallel_tool_use`).
    Field(String),
    /// A content block: `thinking` and `redacted_thinking` blocks, which
    /// only Anthropic's models can read back.
    Block {
        /// Its message's index in `messages`.
        message: usize,
        /// Its index in that message's content.
        index: usize,
        /// Its `type`.
        kind: String,
    },
    /// A tool of Anthropic's own (`web_search_20250305`, `bash_20250124`):
    /// chat upstreams have no such tools.
    Tool {
        /// Its name.
        name: String,
        /// Its `type`.
        kind: String,
    },
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dropped::Field(name) => f.write_str(name),
            Dropped::Block { message, index, kind } => {
                write!(f, "messages[{message}].content[{index}] ({kind})")
            }
            Dropped::Tool { name, kind } => write!(f, "tools: {name} ({kind})"),
        }
    }
}

/// The result of [`to_chat`]: the chat request and what it left out.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Translation {
    /// The chat-completions request.
    pub chat: ChatRequest,
    /// What it does not carry, in request order (log it, or tell the
    /// client in a header).
    pub dropped: Vec<Dropped>,
}

/// Translates a Messages request into a chat-completions request.
///
/// - `system` (a string or text blocks, joined with [`TEXT_JOINER`]) becomes
///   the first message, `role: system`; an empty one is left out.
/// - A user message's text and image blocks become one user message: a
///   string when it is only text (blocks joined with [`TEXT_JOINER`]), else
///   parts in order (`text`, `image_url` with the URL or a
///   `data:<media type>;base64,<data>` URL).
/// - A user message's `tool_result` blocks become `role: tool` messages, in
///   order, *before* the user message made of its other blocks. A result's
///   text blocks are joined with [`TEXT_JOINER`]; `is_error: true` puts
///   [`TOOL_ERROR_PREFIX`] before it. Images in a result cannot go in a tool
///   message: they go at the start of the following user message, after a
///   text part `(image from tool call <id>)`, and the tool message says
///   `(image sent in the next message)` when it has no text.
/// - An assistant message's text (joined) becomes `content` (`null` when
///   none) and its `tool_use` blocks `tool_calls` with the same ids and the
///   input as a JSON string.
/// - `thinking` and `redacted_thinking` blocks are dropped and reported; any
///   other unknown block type is a [`TranslateError::UnsupportedBlock`]; a
///   `tool_use` outside an assistant message, or a `tool_result` or image
///   outside a user message, is a [`TranslateError::InvalidRequest`]. A
///   message left with nothing to say (only thinking blocks) is left out.
/// - `tools` (client tools) become function tools with `input_schema` as
///   `parameters` (an empty object schema when absent); Anthropic's own
///   tools are dropped and reported. `tool_choice` maps `auto` → `"auto"`,
///   `any` → `"required"`, `tool` → the named function, `none` → `"none"`;
///   with no tools left it is dropped (chat upstreams reject it alone).
/// - `max_tokens`, `temperature`, `top_p` as they are, `stop_sequences` →
///   `stop` (an empty list is left out), `stream: true` → `stream: true`
///   (plus `stream_options` per [`Options::stream_usage`]); `top_k`,
///   `metadata` and `thinking` per [`Options`]; `cache_control` is ignored
///   without a report; every unknown top-level field is reported.
/// - `max_tokens` is not required here (count_tokens bodies have none):
///   without it the upstream's default applies.
pub fn to_chat(request: MessagesRequest, options: &Options) -> Result<Translation, TranslateError> {
    let MessagesRequest {
        model,
        messages,
        system,
        max_tokens,
        temperature,
        top_p,
        top_k,
        stop_sequences,
        stream,
        tools,
        tool_choice,
        metadata,
        thinking,
        extra,
    } = request;
    let mut dropped = Vec::new();
    let mut chat = ChatRequest {
        model,
        messages: Vec::with_capacity(messages.len() + 1),
        max_tokens,
        temperature,
        top_p,
        stop: stop_sequences.filter(|s| !s.is_empty()),
        ..ChatRequest::default()
    };

    if let Some(system) = system {
        let text = system_text(system)?;
        if !text.is_empty() {
            chat.messages.push(ChatMessage::System { content: text });
        }
    }
    for (i, message) in messages.into_iter().enumerate() {
        translate_message(i, message, &mut chat.messages, &mut dropped)?;
    }

    if stream == Some(true) {
        chat.stream = Some(true);
        if options.stream_usage {
            chat.stream_options = Some(StreamOptions { include_usage: true });
        }
    }
    if let Some(k) = top_k {
        if options.top_k {
            chat.top_k = Some(k);
        } else {
            dropped.push(Dropped::Field("top_k".into()));
        }
    }

    for tool in tools.unwrap_or_default() {
        match translate_tool(tool) {
            Ok(tool) => chat.tools.push(tool),
            Err(d) => dropped.push(d),
        }
    }
    if let Some(choice) = tool_choice {
        if chat.tools.is_empty() {
            dropped.push(Dropped::Field("tool_choice".into()));
        } else {
            if choice.disables_parallel_tool_use() {
                if options.parallel_tool_calls {
                    chat.parallel_tool_calls = Some(false);
                } else {
                    dropped.push(Dropped::Field("tool_choice.disable_parallel_tool_use".into()));
                }
            }
            chat.tool_choice = Some(match choice {
                ToolChoice::Auto { .. } => ChatToolChoice::Mode(ToolChoiceMode::Auto),
                ToolChoice::Any { .. } => ChatToolChoice::Mode(ToolChoiceMode::Required),
                ToolChoice::None => ChatToolChoice::Mode(ToolChoiceMode::None),
                ToolChoice::Tool { name, .. } => {
                    ChatToolChoice::Function(NamedToolChoice { function: FunctionName { name } })
                }
            });
        }
    }

    if let Some(metadata) = metadata {
        let user = metadata.get("user_id").and_then(Value::as_str).filter(|u| !u.is_empty());
        match user {
            Some(user) if options.user => chat.user = Some(user.to_owned()),
            // Nothing asked, nothing lost.
            _ if metadata.as_object().is_some_and(Map::is_empty) || metadata.is_null() => {}
            _ => dropped.push(Dropped::Field("metadata".into())),
        }
    }
    if let Some(thinking) = thinking {
        let budget = match thinking.get("type").and_then(Value::as_str) {
            Some("enabled") => Some(thinking.get("budget_tokens").and_then(Value::as_u64).unwrap_or(0)),
            _ => None,
        };
        match budget {
            Some(budget) if options.reasoning_effort => {
                chat.reasoning_effort = Some(reasoning_effort(budget).to_owned());
            }
            Some(_) => dropped.push(Dropped::Field("thinking".into())),
            // `disabled` (or a shape this crate does not know that asks for
            // nothing it can tell): the upstream's default is no thinking either.
            None if thinking.get("type").and_then(Value::as_str) == Some("disabled") => {}
            None => dropped.push(Dropped::Field("thinking".into())),
        }
    }
    dropped.extend(extra.into_iter().map(|(name, _)| Dropped::Field(name)));

    Ok(Translation { chat, dropped })
}

/// `reasoning_effort` for a thinking budget: Claude Code's "think" (4,000)
/// is low, "think hard" (10,000) medium, "ultrathink" (31,999) high.
fn reasoning_effort(budget_tokens: u64) -> &'static str {
    match budget_tokens {
        0..4_096 => "low",
        4_096..16_384 => "medium",
        _ => "high",
    }
}

fn system_text(system: MessageContent) -> Result<String, TranslateError> {
    match system {
        MessageContent::Text(text) => Ok(text),
        MessageContent::Blocks(blocks) => {
            let mut text = String::new();
            for (i, block) in blocks.into_iter().enumerate() {
                match block {
                    ContentBlock::Text(block) => push_joined(&mut text, &block.text),
                    other => {
                        return Err(TranslateError::InvalidRequest {
                            reason: format!(
                                "system[{i}]: only text blocks may be in the system prompt, not `{}`",
                                other.kind()
                            ),
                        });
                    }
                }
            }
            Ok(text)
        }
    }
}

fn push_joined(out: &mut String, text: &str) {
    if !out.is_empty() {
        out.push_str(TEXT_JOINER);
    }
    out.push_str(text);
}

fn is_thinking(kind: &str) -> bool {
    matches!(kind, "thinking" | "redacted_thinking")
}

fn translate_message(
    i: usize,
    message: Message,
    out: &mut Vec<ChatMessage>,
    dropped: &mut Vec<Dropped>,
) -> Result<(), TranslateError> {
    let blocks = match message.content {
        MessageContent::Text(text) => {
            out.push(match message.role {
                Role::User => ChatMessage::User { content: ChatContent::Text(text) },
                Role::Assistant => ChatMessage::Assistant { content: Some(text), tool_calls: Vec::new() },
            });
            return Ok(());
        }
        MessageContent::Blocks(blocks) => blocks,
    };
    match message.role {
        Role::User => translate_user(i, blocks, out, dropped),
        Role::Assistant => translate_assistant(i, blocks, out, dropped),
    }
}

fn translate_assistant(
    i: usize,
    blocks: Vec<ContentBlock>,
    out: &mut Vec<ChatMessage>,
    dropped: &mut Vec<Dropped>,
) -> Result<(), TranslateError> {
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for (j, block) in blocks.into_iter().enumerate() {
        match block {
            ContentBlock::Text(block) => match &mut text {
                Some(t) => push_joined(t, &block.text),
                None => text = Some(block.text),
            },
            ContentBlock::ToolUse(call) => tool_calls.push(ChatToolCall {
                id: call.id,
                function: FunctionCall { name: call.name, arguments: arguments_string(&call.input) },
            }),
            ContentBlock::Image(_) | ContentBlock::ToolResult(_) => {
                return Err(misplaced(
                    i,
                    j,
                    "an assistant message",
                    "image and tool_result blocks are user content",
                ));
            }
            ContentBlock::Other(value) => other_block(i, j, &value, dropped)?,
        }
    }
    // An assistant that only calls tools says nothing: `null`, not "".
    let text = text.filter(|t| !t.is_empty() || tool_calls.is_empty());
    if text.is_none() && tool_calls.is_empty() {
        return Ok(());
    }
    out.push(ChatMessage::Assistant { content: text, tool_calls });
    Ok(())
}

fn translate_user(
    i: usize,
    blocks: Vec<ContentBlock>,
    out: &mut Vec<ChatMessage>,
    dropped: &mut Vec<Dropped>,
) -> Result<(), TranslateError> {
    // Parts of the user message that follows the tool messages: first the
    // images tool results returned, then the message's own text and images.
    let mut result_images: Vec<ChatPart> = Vec::new();
    let mut parts: Vec<ChatPart> = Vec::new();
    let mut has_image = false;
    for (j, block) in blocks.into_iter().enumerate() {
        match block {
            ContentBlock::Text(block) => parts.push(ChatPart::Text { text: block.text }),
            ContentBlock::Image(image) => {
                has_image = true;
                parts.push(image_part(image.source));
            }
            ContentBlock::ToolResult(result) => {
                let message = tool_message(i, j, result, &mut result_images)?;
                out.push(message);
            }
            ContentBlock::ToolUse(_) => {
                return Err(misplaced(i, j, "a user message", "tool_use blocks are the assistant's"));
            }
            ContentBlock::Other(value) => other_block(i, j, &value, dropped)?,
        }
    }
    if result_images.is_empty() && !has_image {
        if parts.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for part in parts {
            if let ChatPart::Text { text: t } = part {
                push_joined(&mut text, &t);
            }
        }
        out.push(ChatMessage::User { content: ChatContent::Text(text) });
    } else {
        result_images.extend(parts);
        out.push(ChatMessage::User { content: ChatContent::Parts(result_images) });
    }
    Ok(())
}

fn tool_message(
    i: usize,
    j: usize,
    result: ToolResultBlock,
    images: &mut Vec<ChatPart>,
) -> Result<ChatMessage, TranslateError> {
    let mut text = String::new();
    let mut had_image = false;
    match result.content {
        None => {}
        Some(MessageContent::Text(t)) => text = t,
        Some(MessageContent::Blocks(blocks)) => {
            for (k, block) in blocks.into_iter().enumerate() {
                match block {
                    ContentBlock::Text(block) => push_joined(&mut text, &block.text),
                    ContentBlock::Image(image) => {
                        had_image = true;
                        images.push(ChatPart::Text {
                            text: format!("(image from tool call {})", result.tool_use_id),
                        });
                        images.push(image_part(image.source));
                    }
                    other => {
                        return Err(TranslateError::UnsupportedBlock {
                            location: format!("messages[{i}].content[{j}].content[{k}]"),
                            kind: other.kind().to_owned(),
                        });
                    }
                }
            }
        }
    }
    if text.is_empty() && had_image {
        text.push_str("(image sent in the next message)");
    }
    if result.is_error == Some(true) {
        text = if text.is_empty() { "Error".to_owned() } else { format!("{TOOL_ERROR_PREFIX}{text}") };
    }
    Ok(ChatMessage::Tool { tool_call_id: result.tool_use_id, content: text })
}

fn image_part(source: ImageSource) -> ChatPart {
    let url = match source {
        ImageSource::Base64 { media_type, data } => {
            let mut url = String::with_capacity(media_type.len() + data.len() + 13);
            url.push_str("data:");
            url.push_str(&media_type);
            url.push_str(";base64,");
            url.push_str(&data);
            url
        }
        ImageSource::Url { url } => url,
    };
    ChatPart::ImageUrl { image_url: ImageUrl { url } }
}

/// A tool's input as the JSON string chat completions wants (`{}` for none).
fn arguments_string(input: &Value) -> String {
    match input {
        Value::Null => "{}".to_owned(),
        input => input.to_string(),
    }
}

fn misplaced(i: usize, j: usize, place: &str, why: &str) -> TranslateError {
    TranslateError::InvalidRequest {
        reason: format!("messages[{i}].content[{j}]: not allowed in {place} ({why})"),
    }
}

/// A block of a type the request types do not model: thinking is dropped,
/// anything else refused.
fn other_block(i: usize, j: usize, value: &Value, dropped: &mut Vec<Dropped>) -> Result<(), TranslateError> {
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("(none)");
    if is_thinking(kind) {
        dropped.push(Dropped::Block { message: i, index: j, kind: kind.to_owned() });
        Ok(())
    } else {
        Err(TranslateError::UnsupportedBlock {
            location: format!("messages[{i}].content[{j}]"),
            kind: kind.to_owned(),
        })
    }
}

fn translate_tool(tool: Tool) -> Result<ChatTool, Dropped> {
    match tool.kind.as_deref() {
        None | Some("custom") => {}
        Some(kind) => return Err(Dropped::Tool { name: tool.name, kind: kind.to_owned() }),
    }
    let parameters = match tool.input_schema {
        Some(schema) if !schema.is_null() => schema,
        _ => serde_json::json!({"type": "object", "properties": {}}),
    };
    Ok(ChatTool { function: FunctionDef { name: tool.name, description: tool.description, parameters } })
}
