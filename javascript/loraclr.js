// sd-webui-loraclr: only what the merge tab needs. Works with A1111 (gradio 3.41) and Forge (gradio 4.40):
// uses the WebUI's own globals (gradioApp, randomId, requestProgress, updateInput, switch_to_txt2img)
// and our own elem_ids only.

/* exported loraclr_merge_submit, loraclr_send_to_txt2img */

// Merge button: a task id for wrap_gradio_gpu_call and a progress bar polling shared.state
// (the Checkpoint Merger's pattern). The first input is replaced by the task id.
function loraclr_merge_submit() {
    var id = randomId(); // "task(…)"
    var container = gradioApp().getElementById("loraclr_merge_progress");
    if (container && typeof requestProgress === "function") {
        requestProgress(id, container, null, function() {});
    }
    var res = Array.prototype.slice.call(arguments);
    res[0] = id;
    return res;
}

// "Send to txt2img": put the ready prompt into txt2img's prompt box and switch to that tab.
function loraclr_send_to_txt2img(prompt) {
    var box = gradioApp().querySelector("#txt2img_prompt textarea");
    if (box && prompt) {
        box.value = prompt;
        if (typeof updateInput === "function") {
            updateInput(box);
        }
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    }
    return [prompt];
}
