// Renders /openapi.json as a list of operations with their request schemas, without any CDN.
(function () {
  "use strict";
  var box = document.getElementById("operations");

  function resolve(schema, spec) {
    if (schema && schema.$ref) {
      var name = schema.$ref.split("/").pop();
      return spec.components.schemas[name] || schema;
    }
    return schema;
  }

  function operation(path, method, op, spec) {
    var details = document.createElement("details"), summary = document.createElement("summary");
    var verb = document.createElement("span");
    details.className = "op";
    verb.className = "method"; verb.textContent = method.toUpperCase();
    summary.append(verb, " " + path + (op.summary ? "  \u2014 " + op.summary : ""));
    details.append(summary);
    var content = op.requestBody && op.requestBody.content;
    var json = content && content["application/json"];
    var pre = document.createElement("pre");
    pre.textContent = json
      ? JSON.stringify(resolve(json.schema, spec), null, 2)
      : (op.description || "No request body.");
    details.append(pre);
    return details;
  }

  fetch("/openapi.json").then(function (r) { return r.json(); }).then(function (spec) {
    box.textContent = "";
    Object.keys(spec.paths).sort().forEach(function (path) {
      Object.keys(spec.paths[path]).forEach(function (method) {
        box.append(operation(path, method, spec.paths[path][method], spec));
      });
    });
  }).catch(function (e) { box.textContent = "Cannot load /openapi.json: " + e.message; });
})();
