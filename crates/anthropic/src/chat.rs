//! The OpenAI chat-completions request that [`to_chat`](crate::to_chat)
//! builds. Fields that are `None` or empty are left out of the JSON, so the
//! body carries only what the Messages request asked for.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A `POST /v1/chat/completions` body.
///
/// Serialize it with `serde_json::to_vec`. The gateway may change `model`
/// (its alias mapping) before it does.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model, as the Messages request named it.
    pub model: String,
    /// The conversation, the system prompt first.
    pub messages: Vec<ChatMessage>,
    /// From `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// From `temperature`, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// From `top_p`, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// From `top_k`, when [`Options::top_k`](crate::Options::top_k) allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    /// From `stop_sequences`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// `true` for a streamed answer; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// `{"include_usage": true}` for a stream, when
    /// [`Options::stream_usage`](crate::Options::stream_usage) allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// From `tools` (client tools only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ChatTool>,
    /// From `tool_choice`, when there are tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ChatToolChoice>,
    /// `false` from `disable_parallel_tool_use`, when there are tools and
    /// [`Options::parallel_tool_calls`](crate::Options::parallel_tool_calls)
    /// allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// From `metadata.user_id`, when [`Options::user`](crate::Options::user)
    /// allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// From `thinking`, when
    /// [`Options::reasoning_effort`](crate::Options::reasoning_effort) allows:
    /// `low`, `medium` or `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Ask for a last chunk with the usage.
    pub include_usage: bool,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum ChatMessage {
    /// The system prompt.
    System {
        /// Its text.
        content: String,
    },
    /// The client speaking.
    User {
        /// A string, or parts when there are images.
        content: ChatContent,
    },
    /// The model speaking.
    Assistant {
        /// Its text; `null` when it only calls tools.
        content: Option<String>,
        /// Its tool calls.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ChatToolCall>,
    },
    /// A tool's answer.
    Tool {
        /// The call answered.
        tool_call_id: String,
        /// The answer's text.
        content: String,
    },
}

/// A user message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChatContent {
    /// Text only.
    Text(String),
    /// Text and images, in order.
    Parts(Vec<ChatPart>),
}

/// One part of a user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatPart {
    /// `{"type":"text","text":…}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type":"image_url","image_url":{"url":…}}`.
    ImageUrl {
        /// The image.
        image_url: ImageUrl,
    },
}

/// An image's address: a URL or a `data:` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// `https://…` or `data:<media type>;base64,<data>`.
    pub url: String,
}

/// A function tool: `{"type":"function","function":{…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "function")]
pub struct ChatTool {
    /// The function.
    pub function: FunctionDef,
}

/// A function's name, description and parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of its arguments.
    pub parameters: Value,
}

/// An assistant's tool call: `{"id","type":"function","function":{…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "function")]
pub struct ChatToolCall {
    /// The call's id (the Anthropic `tool_use` id, unchanged).
    pub id: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// A called function and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function.
    pub name: String,
    /// The arguments as a JSON string.
    pub arguments: String,
}

/// `tool_choice`: a mode, or one named function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChatToolChoice {
    /// `"auto"`, `"required"` or `"none"`.
    Mode(ToolChoiceMode),
    /// `{"type":"function","function":{"name":…}}`.
    Function(NamedToolChoice),
}

/// A `tool_choice` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    /// The model decides (Anthropic `auto`).
    Auto,
    /// The model must call a tool (Anthropic `any`).
    Required,
    /// The model must not call tools (Anthropic `none`).
    None,
}

/// A `tool_choice` naming one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "function")]
pub struct NamedToolChoice {
    /// The function.
    pub function: FunctionName,
}

/// A function's name alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionName {
    /// The name.
    pub name: String,
}
